"""Training: the Lightning module that wraps either VAE, and the pieces that make runs resumable.

Batches are indexed by optimizer step, not by epoch position (`StepBatchSampler`): the data a
step sees depends only on the seed and the step, so a run killed and resumed from a checkpoint,
a run split across DDP processes, and a run with gradient accumulation all see the same images
as one uninterrupted process with the same global batch. The random draws of each micro-batch
(flips, posterior noise) are seeded the same way, by the micro-batch's place in the run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import Sampler

from sdn.atomic import atomic_write, write_csv_atomic, write_json_atomic
from sdn.config import ExperimentConfig, TrainConfig, build_model
from sdn.errors import CheckpointError, ConfigError, NonFiniteLossError, write_failure
from sdn.models.disentanglement import beta_schedule

LAST_CHECKPOINT = "last.ckpt"


# --------------------------------------------------------------------------------------------
# Model preparation


def prepare_model(model: nn.Module, train: TrainConfig) -> nn.Module:
    """The release's initialisation, then weight normalisation on every conv (as released).

    `train.init == "orthogonal"`: conv weights orthogonal, `Linear` weights N(0, 0.02); biases
    keep PyTorch's default init. `train.weight_norm`: one gain g per output channel and the
    direction v of each conv weight, which for `ConvTranspose2d` (weight shape (in, out, k, k))
    means along dim 1. The release's density models are normalised, its β-VAE is not.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if train.init == "orthogonal":
        for conv in convs:
            nn.init.orthogonal_(conv.weight)
        for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(linear.weight, 0.0, 0.02)
    if train.weight_norm:
        for conv in convs:
            output_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
            torch.nn.utils.parametrizations.weight_norm(conv, dim=output_dim)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def noise_seed(seed: int, phase: str, index: int) -> int:
    """The generator seed for one batch's random draws (flips, posterior noise)."""
    digest = hashlib.sha256(f"{seed}/{phase}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    (seed, e); the global batch of m is split between processes by rank. An epoch holds whole
    optimizer steps of `accumulate` micro-steps, so k processes, k accumulated micro-batches and
    one k-times larger batch all cut the same images into the same optimizer steps.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, total: int, rank: int = 0, world: int = 1,
        accumulate: int = 1,
    ) -> None:
        if size < batch_size * world * accumulate:
            raise ConfigError(
                f"The training split has {size} images, fewer than one global batch "
                f"({batch_size} x {world} processes x {accumulate} accumulated): lower train.batch_size."
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.total, self.rank, self.world = total, rank, world
        self.start = 0
        self.global_batch = batch_size * world
        self.per_epoch = size // (self.global_batch * accumulate) * accumulate

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
    """Evaluation order: the images cut into batches of `batch_size` and process r takes batches
    r, r+world, … — every image exactly once, and each batch holds the same images whatever the
    number of processes."""

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, limit: int | None = None, batch_size: int = 1
    ) -> None:
        count = size if limit is None else min(size, limit)
        starts = range(rank * batch_size, count, world * batch_size)
        self.indices = [i for start in starts for i in range(start, min(start + batch_size, count))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint_file(path: Path | str) -> Any:
    """A checkpoint's contents, unpickled with `weights_only=True`: tensors and plain values only,
    so a planted or tampered file cannot run code (any other object is refused)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it, so a kill never leaves a
    truncated checkpoint under the final name; loads them with `weights_only=True` (Lightning's own
    resume load included) and names a local write failure (full disk, permissions) as such."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        def explain(error: Exception, tmp: Path) -> CheckpointError | None:
            # torch.save reports a failed write as a RuntimeError without errno: examine the half file
            why = write_failure(error, tmp) if isinstance(error, (OSError, RuntimeError)) else None
            if why is None:
                return None
            return CheckpointError(
                f"{why} while writing the checkpoint {path}: free space (or raise the limit, fix the "
                "permissions), then rerun the same command; the previous checkpoint is kept."
            )

        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), explain)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint_file(path)


class StepCheckpoint(pl.Callback):
    """Writes `path` every `every` optimizer steps. At a step that also validates, it waits for the
    validation, so the checkpoint's curves hold that step's validation row: a run resumed from it
    writes the same curves as an uninterrupted one."""

    def __init__(self, path: Path, every: int, val_every: int | None) -> None:
        self.path, self.every, self.val_every = Path(path), every, val_every
        self._saved_step = 0

    def _save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a saved step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only right after an optimizer step: never in the middle of accumulated micro-batches
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and (self.val_every is None or trainer.global_step % self.val_every != 0):
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)


def resumable_checkpoint(ckpt_dir: Path, fingerprint: str, stale_dir: Path) -> Path | None:
    """The checkpoint to resume from, if one exists and was made with this configuration.

    A checkpoint from another configuration, or one that cannot be read, is moved to `stale_dir`
    (never resumed)."""
    for partial in ckpt_dir.glob(".*.ckpt.tmp"):  # a save cut short by a kill
        partial.unlink(missing_ok=True)
    path = ckpt_dir / LAST_CHECKPOINT
    if not path.exists():
        return None
    try:
        found = load_checkpoint_file(path).get("sdn_fingerprint")
        why = f"was made with a different configuration ({found} != {fingerprint})"
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside
        found, why = "unreadable", f"cannot be read ({type(err).__name__}: {str(err)[:200]})"
    if found == fingerprint:
        return path
    stale_dir.mkdir(parents=True, exist_ok=True)
    target = stale_dir / f"{ckpt_dir.name}-{found}.ckpt"
    os.replace(path, target)
    print(f"[sdn] {path} {why}; moved it to {target} and training starts from scratch.")
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
        # A run without EMA (the release's β-VAE) has none and uses the raw weights throughout.
        self.ema = None if cfg.train.ema_coef is None else copy.deepcopy(self.model).requires_grad_(False)
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
        self._seed_micro_batch(batch_idx)
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
        self._update_ema()

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation, evaluation and sampling use: the EMA twin, or the raw model
        of a run without EMA."""
        return self.model if self.ema is None else self.ema

    @torch.no_grad()
    def _update_ema(self) -> None:
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
        scale = self.dims * math.log(2.0) * max(float(sums[2]), 1.0)
        neg_elbo, kl = float(sums[0]) / scale, float(sums[1]) / scale
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
        checkpoint["sdn_experiment"] = self.cfg.name
        checkpoint["sdn_curves"] = {"train": self.train_rows, "val": self.val_rows}
        # no generator state: every batch seeds its own draws (_seed_micro_batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        curves = checkpoint.get("sdn_curves", {})
        self.train_rows = list(curves.get("train", []))
        self.val_rows = list(curves.get("val", []))


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


# --------------------------------------------------------------------------------------------
# The whole training run (what `stages/train.py` calls)


def _dataset(lmdb_dir: Path, split: str, dataset: str):
    """A checked split (truncation, dataset name, split, per-record checksums): see `open_split`."""
    from sdn.data import open_split

    return open_split(lmdb_dir, split, dataset)


def _check_image_shape(dataset, cfg: ExperimentConfig, split: str) -> None:
    from sdn.errors import DatasetError

    expected = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    found = tuple(dataset[0][0].shape)
    if found != expected:
        raise DatasetError(
            f"{cfg.dataset}/{split} holds images of shape {found} but experiments.{cfg.name} expects "
            f"{expected} (from datasets.{cfg.dataset}.image_size/channels): fix params.yaml or re-run "
            f"dvc repro convert@{cfg.dataset}."
        )


TRAIN_COLUMNS = ("step", "loss_bpd", "neg_elbo_bpd", "kl_bpd", "lr")
VAL_COLUMNS = ("step", "neg_elbo_bpd", "kl_bpd", "images")


class LiveCurves(pl.Callback):
    """Writes the curves while training runs, so that `dvc plots show` and `dvc exp show` follow a
    running run and keep what a killed one reached: train.csv and val.csv grow by whole rows
    (one `write` each, appended after every log interval and validation), live.json holds the
    latest figures (replaced atomically).

    The checkpoint carries its own copy of the rows (`sdn_curves`). When a run starts or resumes,
    the files are rewritten from it: rows a killed run logged after its last checkpoint are
    dropped and logged again, identically, by the resumed run, so the curves of a resumed run
    equal those of an uninterrupted one, with no step missing or repeated."""

    def __init__(self, metrics_dir: Path) -> None:
        self.dir = metrics_dir
        self.written = {"train": 0, "val": 0}

    def _files(self) -> dict[str, tuple[Path, tuple[str, ...]]]:
        return {"train": (self.dir / "train.csv", TRAIN_COLUMNS), "val": (self.dir / "val.csv", VAL_COLUMNS)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: VAEModule) -> None:
        if not trainer.is_global_zero:
            return
        for kind, (path, columns) in self._files().items():
            rows = getattr(pl_module, f"{kind}_rows")
            if rows:  # resumed: the checkpoint's rows replace whatever the files hold
                write_csv_atomic(rows, path, columns)
            self.written[kind] = len(rows)
        if pl_module.train_rows or pl_module.val_rows:
            self._write_latest(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._append(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._append(trainer, pl_module)

    def _append(self, trainer: pl.Trainer, pl_module: VAEModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        grew = False
        for kind, (path, columns) in self._files().items():
            every = getattr(pl_module, f"{kind}_rows")
            rows = every[self.written[kind]:]
            if not rows:
                continue
            if self.written[kind] == 0:
                # the file appears with its first rows, replacing any earlier run's in one step
                write_csv_atomic(every, path, columns)
            else:
                text = "".join(",".join(_csv_value(row.get(c)) for c in columns) + "\n" for row in rows)
                # one write to a file opened for appending: a kill leaves whole rows only
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, text.encode())
                finally:
                    os.close(fd)
            self.written[kind] += len(rows)
            grew = True
        if grew:
            self._write_latest(pl_module)

    def write_all(self, pl_module: VAEModule) -> None:
        """The complete curves and latest figures, also when `fit` had nothing left to run (a run
        resumed at its last step): DVC removes a stage's outputs before running it."""
        for kind, (path, columns) in self._files().items():
            write_csv_atomic(getattr(pl_module, f"{kind}_rows"), path, columns)
        self._write_latest(pl_module)

    def _write_latest(self, pl_module: VAEModule) -> None:
        latest: dict[str, Any] = {"step": int(pl_module.global_step)}
        for kind in ("train", "val"):
            rows = getattr(pl_module, f"{kind}_rows")
            if rows:
                latest[kind] = {k: v for k, v in rows[-1].items() if k != "step"}
        write_json_atomic(latest, self.dir / "live.json", sort_keys=False)


def _csv_value(value: Any) -> str:
    # the format pandas writes, so that appended rows and rewritten files agree byte for byte
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


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
) -> VAEModule:
    """Train (or resume) one experiment; writes `last.ckpt` and the training curves."""
    from torch.utils.data import DataLoader

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set = _dataset(lmdb_dir, "train", cfg.dataset)
    val_set = _dataset(lmdb_dir, "val", cfg.dataset)
    _check_image_shape(train_set, cfg, "train")
    _check_image_shape(val_set, cfg, "val")

    trainer_cfg, train = cfg.trainer, cfg.train
    k = train.accumulate_grad_batches
    resume = resumable_checkpoint(ckpt_dir, config_fingerprint(cfg), stale_dir)

    # val_batches counts batches of the whole validation, not of each process: every run of an
    # experiment, on any number of processes, validates on the same images, each exactly once.
    val_limit = None if train.val_batches is None else train.val_batches * cfg.evaluate.batch_size
    validates = val_limit != 0
    checkpointing = StepCheckpoint(
        ckpt_dir / LAST_CHECKPOINT, train.ckpt_every_steps, train.val_every_steps if validates else None
    )
    live = LiveCurves(metrics_dir)
    trainer = pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=_strategy(trainer_cfg.strategy),
        precision=trainer_cfg.precision,
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
        callbacks=[checkpointing, live, *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        default_root_dir=str(ckpt_dir),
    )
    start_step = 0
    if resume is not None:
        start_step = int(load_checkpoint_file(resume)["global_step"])
        print(f"[sdn] resuming {cfg.name} from {resume} at step {start_step}")
    sampler = StepBatchSampler(
        len(train_set), train.batch_size, cfg.seed, total=train.max_steps * k,
        rank=trainer.global_rank, world=trainer.world_size, accumulate=k,
    )
    sampler.start = start_step * k
    module = VAEModule(cfg, steps_per_epoch=sampler.per_epoch // k)
    workers = trainer_cfg.num_workers
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.evaluate.batch_size, num_workers=workers,
        sampler=ShardSampler(
            len(val_set), trainer.global_rank, trainer.world_size, limit=val_limit,
            batch_size=cfg.evaluate.batch_size,
        ),
    )
    with warnings.catch_warnings():
        # Lightning cannot see that StepBatchSampler restarts at the checkpoint's step
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(ckpt_dir / LAST_CHECKPOINT, weights_only=False)
    if trainer.is_global_zero:
        live.write_all(module)
    return module
