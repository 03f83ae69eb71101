"""Training: the Lightning module that wraps either VAE, and the pieces that make runs resumable.

Batches are indexed by optimizer step, not by epoch position (`StepBatchSampler`): the data a
step sees depends only on the seed and the step, so a run killed and resumed from a checkpoint,
a run split across DDP processes, and a run with gradient accumulation all see the same images
as one uninterrupted process with the same global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import Sampler

from sdn.config import ExperimentConfig, TrainConfig, build_model
from sdn.models.disentanglement import beta_schedule
from sdn.pipeline import NonFiniteLossError

LAST_CHECKPOINT = "last.ckpt"


# --------------------------------------------------------------------------------------------
# Model preparation


def prepare_model(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Orthogonal init of conv weights, then weight normalisation on every conv (as released)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if train.init == "orthogonal":
        for conv in convs:
            nn.init.orthogonal_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    if train.weight_norm:
        for conv in convs:
            torch.nn.utils.parametrizations.weight_norm(conv)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What a checkpoint must match to be resumed: model, data, seed and the optimisation
    settings. Run-length and logging knobs are left out so `max_steps` can be raised."""
    train = dataclasses.asdict(cfg.train)
    for key in ("max_steps", "val_every_steps", "val_batches", "ckpt_every_steps"):
        train.pop(key)
    payload = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "kind": cfg.kind,
        "model": dataclasses.asdict(cfg.model),
        "train": train,
        "precision": str(cfg.trainer.precision),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Data order


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches for micro-steps `start, start+1, …, total-1`.

    Micro-step m belongs to epoch e = m // per_epoch, whose order is a permutation seeded by
    (seed, e); the global batch of m is split between processes by rank.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, total: int, rank: int = 0, world: int = 1
    ) -> None:
        if size < batch_size * world:
            raise ValueError(
                f"The training split has {size} images, fewer than one global batch "
                f"({batch_size} x {world} processes): lower train.batch_size."
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.total, self.rank, self.world = total, rank, world
        self.start = 0
        self.global_batch = batch_size * world
        self.per_epoch = size // self.global_batch

    def _order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = None, None
        for step in range(self.start, self.total):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self._order(epoch)
            first = (step % self.per_epoch) * self.global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        # The whole run: on resume Lightning restores its batch index to `start` and ends the
        # epoch at this length, so `total - start` would end it early and repeat batches.
        return self.total


class ShardSampler(Sampler[int]):
    """Evaluation order: process r takes images r, r+world, … — every image exactly once."""

    def __init__(self, size: int, rank: int = 0, world: int = 1, limit: int | None = None) -> None:
        self.indices = list(range(size if limit is None else min(size, limit)))[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------
# Checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it, so a kill never leaves a
    truncated checkpoint under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def resumable_checkpoint(ckpt_dir: Path, fingerprint: str, stale_dir: Path) -> Path | None:
    """The checkpoint to resume from, if one exists and was made with this configuration.

    A checkpoint from another configuration is moved to `stale_dir` (never resumed)."""
    path = ckpt_dir / LAST_CHECKPOINT
    if not path.exists():
        return None
    try:
        found = torch.load(path, map_location="cpu", weights_only=False).get("sdn_fingerprint")
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside
        found = f"unreadable ({type(err).__name__})"
    if found == fingerprint:
        return path
    stale_dir.mkdir(parents=True, exist_ok=True)
    target = stale_dir / f"{ckpt_dir.name}-{str(found)[:16].replace(' ', '_')}.ckpt"
    os.replace(path, target)
    print(
        f"[sdn] {path} was made with a different configuration ({found} != {fingerprint}); "
        f"moved it to {target} and training starts from scratch."
    )
    return None


# --------------------------------------------------------------------------------------------
# The Lightning module


class VAEModule(pl.LightningModule):
    """Wraps a DensityVAE or DisentanglementVAE: loss, EMA weights, optimiser, schedules, curves."""

    def __init__(self, cfg: ExperimentConfig, steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.model = prepare_model(build_model(cfg), cfg.train)
        # The averaged weights live in a frozen twin: they are saved with the checkpoint and
        # used for validation, evaluation and sampling, while training continues on the raw ones.
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.dims = self.model.dims_per_image
        self.train_rows: list[dict[str, float]] = []
        self.val_rows: list[dict[str, float]] = []
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

    def beta(self) -> float:
        model = self.cfg.model
        return beta_schedule(self.global_step + 1, model.beta_final, model.beta_rate)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.cfg.flip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        out = self.model(self.model.obs.preprocess(images))
        if self.cfg.kind == "density":
            loss = out["loss"].mean()
        else:
            loss = self.model.loss(out, self.beta()).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} of {self.cfg.name}. "
                "Training stopped; the last good checkpoint is kept. Lower train.lr, set "
                "train.gradient_clip_val, or use precision 32-true."
            )
        scale = self.dims * math.log(2.0)
        elbo = out["elbo"].detach().mean() / scale
        kl = out["kl"].detach().mean() / scale
        self.log("train/loss_bpd", loss.detach() / scale, prog_bar=True)
        self.log("train/elbo_bpd", -elbo)
        if self.trainer.is_global_zero and (self.global_step % self.trainer.log_every_n_steps == 0):
            if self._is_last_micro_batch(batch_idx):
                self.train_rows.append({
                    "step": self.global_step + 1,
                    "loss_bpd": float(loss.detach() / scale),
                    "neg_elbo_bpd": float(-elbo),
                    "kl_bpd": float(kl),
                    "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
                })
        return loss

    def _is_last_micro_batch(self, batch_idx: int) -> bool:
        k = self.trainer.accumulate_grad_batches
        return (batch_idx + 1) % k == 0

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        coef = self.cfg.train.ema_coef
        for averaged, raw in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            averaged.lerp_(raw.detach(), 1.0 - coef)
        for averaged, raw in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            averaged.copy_(raw)

    # -- validation (EMA weights) -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = self.ema(self.ema.obs.preprocess(images))
        self._val_sums += torch.stack([
            -out["elbo"].double().sum(), out["kl"].double().sum(),
            torch.tensor(float(len(images)), dtype=torch.float64, device=self.device),
        ])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        scale = self.dims * math.log(2.0) * max(float(sums[2]), 1.0)
        neg_elbo, kl = float(sums[0]) / scale, float(sums[1]) / scale
        self.log("val/neg_elbo_bpd", neg_elbo, prog_bar=True, sync_dist=False, rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.val_rows.append({
                "step": self.global_step, "neg_elbo_bpd": neg_elbo, "kl_bpd": kl, "images": int(sums[2]),
            })

    # -- checkpoint extras --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sdn_fingerprint"] = config_fingerprint(self.cfg)
        checkpoint["sdn_experiment"] = self.cfg.name
        checkpoint["sdn_curves"] = {"train": self.train_rows, "val": self.val_rows}
        checkpoint["sdn_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        curves = checkpoint.get("sdn_curves", {})
        self.train_rows = list(curves.get("train", []))
        self.val_rows = list(curves.get("val", []))
        self._pending_rng = checkpoint.get("sdn_rng")

    def on_train_start(self) -> None:
        # Restored here, after Lightning's own set-up has drawn from the generator, so the
        # resumed run draws the same posterior noise and flips as the uninterrupted one.
        if getattr(self, "_pending_rng", None) is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None


def load_ema_model(cfg: ExperimentConfig, ckpt_path: Path) -> nn.Module:
    """The EMA weights of a trained experiment, ready for evaluation (eval mode, on CPU)."""
    if not ckpt_path.exists():
        raise FileNotFoundError(
            f"{ckpt_path} not found: train the experiment first (dvc repro train@{cfg.name})."
        )
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if checkpoint.get("sdn_fingerprint") != config_fingerprint(cfg):
        raise RuntimeError(
            f"{ckpt_path} was trained with a different configuration than experiments.{cfg.name} "
            f"in params.yaml: re-run training (dvc repro train@{cfg.name})."
        )
    module = VAEModule(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    return module.ema.eval()


# --------------------------------------------------------------------------------------------
# The whole training run (what `stages/train.py` calls)


def _dataset(lmdb_dir: Path, split: str, dataset: str):
    from sdn.data import LMDBImageDataset

    path = lmdb_dir / split
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: convert the dataset first (dvc repro convert@{dataset})."
        )
    return LMDBImageDataset(path)


def _check_image_shape(dataset, cfg: ExperimentConfig, split: str) -> None:
    expected = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    found = tuple(dataset[0][0].shape)
    if found != expected:
        raise ValueError(
            f"{cfg.dataset}/{split} holds images of shape {found} but experiments.{cfg.name} expects "
            f"{expected} (from datasets.{cfg.dataset}.image_size/channels): fix params.yaml or re-run "
            f"dvc repro convert@{cfg.dataset}."
        )


def write_csv_atomic(rows: list[dict[str, float]], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)


def train_experiment(
    cfg: ExperimentConfig,
    lmdb_dir: Path,
    ckpt_dir: Path,
    metrics_dir: Path,
    stale_dir: Path = Path("data/stale-checkpoints"),
    extra_callbacks: list[pl.Callback] | None = None,
) -> VAEModule:
    """Train (or resume) one experiment; writes `last.ckpt` and the training curves."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set = _dataset(lmdb_dir, "train", cfg.dataset)
    val_set = _dataset(lmdb_dir, "val", cfg.dataset)
    _check_image_shape(train_set, cfg, "train")
    _check_image_shape(val_set, cfg, "val")

    trainer_cfg, train = cfg.trainer, cfg.train
    k = train.accumulate_grad_batches
    devices = trainer_cfg.devices
    world = (devices if isinstance(devices, int) else 1) * trainer_cfg.num_nodes
    steps_per_epoch = len(train_set) // (train.batch_size * world * k)
    fingerprint = config_fingerprint(cfg)
    resume = resumable_checkpoint(ckpt_dir, fingerprint, stale_dir)

    module = VAEModule(cfg, steps_per_epoch=steps_per_epoch)
    checkpointing = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=train.ckpt_every_steps,
        save_top_k=0, save_last=True, auto_insert_metric_name=False,
    )
    trainer = pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        deterministic=trainer_cfg.deterministic,
        max_steps=train.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=k,
        gradient_clip_val=train.gradient_clip_val,
        val_check_interval=train.val_every_steps * k,
        check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches if train.val_batches is not None else 1.0,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        logger=False,
        callbacks=[checkpointing, *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        default_root_dir=str(ckpt_dir),
    )
    start_step = 0
    if resume is not None:
        start_step = int(torch.load(resume, map_location="cpu", weights_only=False)["global_step"])
        print(f"[sdn] resuming {cfg.name} from {resume} at step {start_step}")
    sampler = StepBatchSampler(
        len(train_set), train.batch_size, cfg.seed, total=train.max_steps * k,
        rank=trainer.global_rank, world=trainer.world_size,
    )
    sampler.start = start_step * k
    workers = trainer_cfg.num_workers
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.evaluate.batch_size, num_workers=workers,
        sampler=ShardSampler(len(val_set), trainer.global_rank, trainer.world_size),
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(ckpt_dir / LAST_CHECKPOINT)
    if trainer.is_global_zero:
        write_csv_atomic(module.train_rows, metrics_dir / "train.csv")
        write_csv_atomic(module.val_rows, metrics_dir / "val.csv")
    return module
