"""The training progress bar: optimizer steps out of `train.max_steps`.

A run is one Lightning epoch holding every micro-batch of the run (`StepBatchSampler`, with
`max_epochs=-1`), so Lightning's own bars say nothing true about its length: the Rich bar reads
`Epoch 0/-2` (`max_epochs - 1`) and the tqdm bar counts micro-batches, `accumulate_grad_batches`
times as many as steps. This bar counts what a run's length is set in, optimizer steps, from the
step a resumed run starts at.
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

# `step 300/800 |███▊     | [02:30<04:10,  2.00step/s, val/neg_elbo_bpd=5.17]`
STEP_BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bars, the training one counting optimizer steps of `max_steps` (the
    validation bar is Lightning's)."""

    def init_train_tqdm(self) -> Tqdm:
        # Lightning's arguments, with this bar's format, unit and count
        return Tqdm(
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=STEP_BAR_FORMAT, unit="step",
            total=self.trainer.max_steps, initial=self.trainer.global_step,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # Lightning resets the bar to count this epoch's micro-batches; a resumed run, which
        # starts inside its epoch, never gets here
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = bar.last_print_n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        # with accumulation several micro-batches end on the same step: show each step once
        if bar.disable or step == bar.n or not self._should_update(step, bar.total):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: BaseException) -> None:
        # a stopped run's bars end where it stopped, not whenever they are garbage collected (in
        # the middle of whatever the process prints next)
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()
