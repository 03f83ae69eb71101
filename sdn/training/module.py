"""The Lightning module that trains either VAE: seeded micro-batches, EMA weights, the optimiser
and its schedule, validation, and the checkpoint's extras."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from sdn.config import ExperimentConfig
from sdn.data.datamodule import random_flips
from sdn.errors import CheckpointError, NonFiniteLossError
from sdn.models import build_model, prepare_model
from sdn.models.distributions import bits_per_dim
from sdn.training.checkpoints import config_fingerprint, load_checkpoint_file


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def noise_seed(seed: int, phase: str, index: int) -> int:
    """The generator seed for one batch's random draws (flips, posterior noise)."""
    digest = hashlib.sha256(f"{seed}/{phase}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class VAEModule(pl.LightningModule):
    """Wraps a DensityVAE or DisentanglementVAE: loss, EMA weights, optimiser, schedules, curves."""

    def __init__(self, cfg: ExperimentConfig, steps_per_epoch: int = 1, code: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.code = code  # the train stage's code_fingerprint, saved with each checkpoint
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.model = prepare_model(build_model(cfg), cfg.train)
        # The averaged weights live in a frozen twin: they are saved with the checkpoint and
        # used for validation, evaluation and sampling, while training continues on the raw ones.
        # A run without EMA (the release's β-VAE) has none and uses the raw weights throughout.
        self.ema = None if cfg.train.ema_coef is None else copy.deepcopy(self.model).requires_grad_(False)
        self.dims = self.model.dims_per_image
        self.train_rows: list[dict[str, float]] = []
        self.val_rows: list[dict[str, float]] = []
        self._step_figures: list[Tensor] = []
        self._val_sums: Tensor | None = None

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        train = self.cfg.train
        optimizer = torch.optim.Adamax(self.model.parameters(), lr=train.lr)
        # ExponentialLR applied once per epoch, as released, but indexed by step so that resumed
        # and distributed runs decay identically.
        decay, per_epoch = train.lrate_decay, self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay ** (step // per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._seed_micro_batch(batch_idx)
        if self.cfg.flip:  # datasets.<name>.flip; drawn after the seed, before the posterior noise
            images = random_flips(images)
        out = self.model(self.model.obs.preprocess(images))
        loss = self.model.loss(out, self.global_step).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} of {self.cfg.name}. "
                "Training stopped; the last good checkpoint is kept. Lower train.lr, set "
                "train.gradient_clip_val, or use precision 32-true."
            )
        elbo = bits_per_dim(out["elbo"].detach().mean(), self.dims)
        kl = bits_per_dim(out["kl"].detach().mean(), self.dims)
        self.log("train/loss_bpd", bits_per_dim(loss.detach(), self.dims), prog_bar=True)
        self.log("train/elbo_bpd", -elbo)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self._record_step(batch_idx, torch.stack([bits_per_dim(loss.detach(), self.dims), -elbo, kl]))
        return loss

    def _record_step(self, batch_idx: int, figures: Tensor) -> None:
        """The step's row of train.csv: loss, −ELBO and KL averaged over its global batch (every
        micro-batch of every process), so that the curve does not depend on how the batch is
        split between processes and accumulation. Every process takes part in the average."""
        self._step_figures.append(figures)
        if not self._is_last_micro_batch(batch_idx):
            return
        figures = self.trainer.strategy.reduce(torch.stack(self._step_figures).mean(0), reduce_op="mean")
        self._step_figures = []
        if self.trainer.is_global_zero:
            loss, neg_elbo, kl = figures.tolist()
            self.train_rows.append({
                "step": self.global_step + 1,
                "loss_bpd": loss,
                "neg_elbo_bpd": neg_elbo,
                "kl_bpd": kl,
                "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
            })

    def _seed_micro_batch(self, batch_idx: int) -> None:
        """Flips and posterior noise depend only on the seed and the micro-batch's place in the
        run, numbered as `StepBatchSampler` deals the images: DDP ranks draw what one process
        accumulating the same micro-batches draws, and a resumed run what an uninterrupted one does."""
        trainer = self.trainer
        k = trainer.accumulate_grad_batches
        micro = (self.global_step * k + batch_idx % k) * trainer.world_size + trainer.global_rank
        torch.manual_seed(noise_seed(self.cfg.seed, "train", micro))

    def _is_last_micro_batch(self, batch_idx: int) -> bool:
        k = self.trainer.accumulate_grad_batches
        return (batch_idx + 1) % k == 0

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation, evaluation and sampling use: the EMA twin, or the raw model
        of a run without EMA."""
        return self.model if self.ema is None else self.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        """Average the raw weights into the EMA twin (after each optimizer step); nothing without EMA."""
        if self.ema is None:
            return
        coef = self.cfg.train.ema_coef
        for averaged, raw in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            averaged.lerp_(raw.detach(), 1.0 - coef)
        for averaged, raw in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            averaged.copy_(raw)

    # -- validation (EMA weights, or the raw ones without EMA) ------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._seed_validation_batch(0)

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # seeded ahead, so that a batch starts with the generator state it draws from
        self._seed_validation_batch(batch_idx + 1)

    def _seed_validation_batch(self, batch_idx: int) -> None:
        """Numbered as ShardSampler deals the batches: the same noise on any number of processes."""
        index = batch_idx * self.trainer.world_size + self.trainer.global_rank
        torch.manual_seed(noise_seed(self.cfg.seed, "val", index))

    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        model = self.eval_model
        out = model(model.obs.preprocess(images))
        self._val_sums += torch.stack([
            -out["elbo"].double().sum(), out["kl"].double().sum(),
            torch.tensor(float(len(images)), dtype=torch.float64, device=self.device),
        ])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        images = max(float(sums[2]), 1.0)
        neg_elbo = bits_per_dim(float(sums[0]), self.dims, images)
        kl = bits_per_dim(float(sums[1]), self.dims, images)
        self.log("val/neg_elbo_bpd", neg_elbo, prog_bar=True, sync_dist=False, rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.val_rows.append({
                "step": self.global_step, "neg_elbo_bpd": neg_elbo, "kl_bpd": kl, "images": int(sums[2]),
            })

    # -- checkpoint extras --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A step can turn the weights into NaN while its loss was still finite: never let such
        # weights replace the last good checkpoint.
        broken = [
            name for name, value in checkpoint["state_dict"].items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())
        ]
        if broken:
            raise NonFiniteLossError(
                f"non-finite weights ({', '.join(broken[:3])}) after step {self.global_step} of "
                f"{self.cfg.name}. Training stopped; the last good checkpoint is kept. Lower train.lr, "
                "set train.gradient_clip_val, or use precision 32-true."
            )
        checkpoint["sdn_fingerprint"] = config_fingerprint(self.cfg)
        checkpoint["sdn_code"] = self.code
        checkpoint["sdn_experiment"] = self.cfg.name
        checkpoint["sdn_curves"] = {"train": self.train_rows, "val": self.val_rows}
        checkpoint[MICRO_BATCHES_KEY] = self.trainer.accumulate_grad_batches
        # no generator state: every batch seeds its own draws (_seed_micro_batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        curves = checkpoint.get("sdn_curves", {})
        self.train_rows = list(curves.get("train", []))
        self.val_rows = list(curves.get("val", []))
        if self._trainer is not None:  # resumed by a Trainer, whose loops read the counters next
            recount_micro_batches(checkpoint, self.trainer.accumulate_grad_batches)


# The micro-batches each process accumulated per optimizer step in the run that wrote a checkpoint.
MICRO_BATCHES_KEY = "sdn_micro_batches"


def recount_micro_batches(checkpoint: dict[str, Any], micro_batches: int) -> None:
    """Lightning's batch counters of `checkpoint`, recounted for `micro_batches` per step.

    Lightning counts the micro-batches each process has seen, and finds the accumulation
    boundaries, the validation steps and the epoch's end from them. A checkpoint of the same run
    split another way (8 processes there, 1 here accumulating 8) holds the same steps but another
    count: each counter becomes the same number of whole steps in this run's micro-batches, less
    the same lag (a counter Lightning advances after the save lags it by one)."""
    saved = checkpoint.get(MICRO_BATCHES_KEY)
    loops = checkpoint.get("loops")
    if saved is None or saved == micro_batches or not loops:
        return
    progress = loops["fit_loop"]["epoch_loop.batch_progress"]
    for counters in (progress["total"], progress["current"]):
        for name, count in counters.items():
            steps = -(-count // saved)  # whole steps begun
            counters[name] = steps * micro_batches - (steps * saved - count)


def load_ema_model(cfg: ExperimentConfig, ckpt_path: Path) -> nn.Module:
    """The weights a trained experiment is evaluated with, ready for evaluation (eval mode, on
    CPU): the EMA weights, or for a run without EMA (`train.ema_coef: null`, the release's
    β-VAE) the raw trained weights."""
    if not ckpt_path.exists():
        raise FileNotFoundError(
            f"{ckpt_path} not found: train the experiment first (dvc repro train@{cfg.name})."
        )
    try:
        checkpoint = load_checkpoint_file(ckpt_path)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a damaged file
        raise CheckpointError(
            f"{ckpt_path} cannot be read ({type(err).__name__}: {str(err)[:200]}): re-run training "
            f"(dvc repro train@{cfg.name})."
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("sdn_fingerprint") != config_fingerprint(cfg):
        raise CheckpointError(
            f"{ckpt_path} was trained with a different configuration than experiments.{cfg.name} "
            f"in params.yaml: re-run training (dvc repro train@{cfg.name})."
        )
    module = VAEModule(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval_model.eval()


