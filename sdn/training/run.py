"""The whole training run: what `stages/train.py` calls."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl

from sdn.config import ExperimentConfig
from sdn.data.datamodule import ImageDataModule
from sdn.training.checkpoints import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    StepCheckpoint,
    config_fingerprint,
    load_checkpoint_file,
    resumable_checkpoint,
)
from sdn.training.curves import LiveCurves
from sdn.training.machine import MachineFit, fit_to_machine
from sdn.training.module import VAEModule
from sdn.training.processes import launched_rank, reports_for_the_run, run_ranks
from sdn.training.progress import StepProgressBar


def _strategy(name: str) -> str:
    # The top ladder layer's bottom-up output is not used by the loss (as released), so DDP must
    # look for unused parameters or it stops at the first step.
    if name in ("ddp", "ddp_spawn"):
        return f"{name}_find_unused_parameters_true"
    return name


def train_experiment(
    cfg: ExperimentConfig,
    lmdb_dir: Path,
    ckpt_dir: Path,
    metrics_dir: Path,
    stale_dir: Path = Path("data/stale-checkpoints"),
    extra_callbacks: list[pl.Callback] | None = None,
    fit: MachineFit | None = None,
    code: str | None = None,
) -> VAEModule | None:
    """Train (or resume) one experiment on this machine; writes `last.ckpt` and the training curves.

    `fit` (by default `fit_to_machine(cfg)`) says how: with several processes, the process that
    starts the run launches one per rank, this same command (`run_ranks`), waits for them and
    returns None; each rank, and a run in one process, trains and returns its module.

    `code` names the code that trains (the train stage passes a hash of its code deps): a
    checkpoint resumes only if the same configuration and the same code made it. A run already
    finished by them trains nothing and leaves `last.ckpt` untouched, byte for byte; it only
    writes its curves again from the checkpoint (DVC removes a stage's outputs before running it)."""
    fit = fit_to_machine(cfg) if fit is None else fit
    rank = launched_rank()
    if fit.summary and reports_for_the_run():
        print(f"[sdn] {fit.summary}")
    run_cfg = fit.run_config(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # opened (and checked) here, before any rank starts: a data error is reported once
    data = ImageDataModule.for_experiment(run_cfg, lmdb_dir, pin_memory=fit.accelerator == "gpu")
    resume = resumable_checkpoint(ckpt_dir, config_fingerprint(cfg), stale_dir, code, cfg.train.max_steps)
    checkpoint = None if resume is None else load_checkpoint_file(resume)
    if checkpoint is not None and int(checkpoint["global_step"]) == cfg.train.max_steps and rank is None:
        return finished_run(run_cfg, checkpoint, metrics_dir, code)
    if fit.launches_ranks and rank is None:
        run_ranks(fit.processes)
        return None

    trainer_cfg, train = run_cfg.trainer, run_cfg.train
    k = train.accumulate_grad_batches
    validates = data.val_limit != 0
    checkpointing = StepCheckpoint(
        ckpt_dir / LAST_CHECKPOINT, train.ckpt_every_steps, train.val_every_steps if validates else None
    )
    live = LiveCurves(metrics_dir)
    trainer = pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=_strategy(trainer_cfg.strategy),
        precision=fit.precision,
        deterministic=trainer_cfg.deterministic,
        max_steps=train.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=k,
        gradient_clip_val=train.gradient_clip_val,
        val_check_interval=train.val_every_steps * k,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if validates else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,  # StepCheckpoint writes last.ckpt
        # the bar counts optimizer steps of max_steps: Lightning's would read `Epoch 0/-2`
        callbacks=[checkpointing, live, *([StepProgressBar()] if trainer_cfg.progress_bar else []),
                   *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        default_root_dir=str(ckpt_dir),
    )
    if resume is not None:
        data.start_step = int(checkpoint["global_step"])
        if not rank:  # rank 0, or a run in one process
            print(f"[sdn] resuming {cfg.name} from {resume} at step {data.start_step}")
    module = VAEModule(run_cfg, steps_per_epoch=data.steps_per_epoch(trainer.world_size), code=code)
    with warnings.catch_warnings():
        # Lightning cannot see that StepBatchSampler restarts at the checkpoint's step
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(ckpt_dir / LAST_CHECKPOINT, weights_only=False)
    if trainer.is_global_zero:
        live.write_all(module.train_rows, module.val_rows, module.global_step)
    return module


def finished_run(cfg: ExperimentConfig, checkpoint: dict, metrics_dir: Path, code: str | None) -> VAEModule:
    """The run `checkpoint` completed, loaded without training or saving anything; its curves are
    written again from the checkpoint's own rows."""
    step = int(checkpoint["global_step"])
    print(f"[sdn] {cfg.name} finished at step {step} with this configuration and code: nothing to train")
    module = VAEModule(cfg, code=code)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    LiveCurves(metrics_dir).write_all(module.train_rows, module.val_rows, step)
    return module
