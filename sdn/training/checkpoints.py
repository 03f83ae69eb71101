"""Checkpoints: atomic writes, step-driven saves, resuming only a matching configuration."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from sdn.atomic import atomic_write
from sdn.config import ExperimentConfig
from sdn.errors import CheckpointError, write_failure

LAST_CHECKPOINT = "last.ckpt"


def micro_batches_per_step(cfg: ExperimentConfig) -> int:
    """Micro-batches of `train.batch_size` in one optimizer step, over every process:
    devices x nodes x accumulated (a `devices` string such as "auto" counts as given)."""
    trainer = cfg.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) else 1
    return devices * trainer.num_nodes * cfg.train.accumulate_grad_batches


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What a checkpoint must match to be resumed: model, data, seed and the optimisation
    settings. Run-length and logging knobs are left out so `max_steps` can be raised.

    The batch enters as the micro-batch and the micro-batches per step, not as their split
    between processes and accumulation: 8 devices, or 1 accumulating 8 micro-batches, is one
    run (`sdn.training.machine`), and its checkpoint resumes on either machine. (Recorded as the
    accumulation one process would need, so that one-process runs keep their fingerprints.)"""
    train = dataclasses.asdict(cfg.train)
    for key in ("max_steps", "val_every_steps", "val_batches", "ckpt_every_steps"):
        train.pop(key)
    train["accumulate_grad_batches"] = micro_batches_per_step(cfg)
    payload = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "kind": cfg.kind,
        "model": dataclasses.asdict(cfg.model),
        "train": train,
        "precision": str(cfg.trainer.precision),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def resumable_checkpoint(
    ckpt_dir: Path, fingerprint: str, stale_dir: Path, code: str | None = None, max_steps: int | None = None
) -> Path | None:
    """The checkpoint to resume from, if one exists and was made by this run: the same
    configuration (`fingerprint`), the same code (`code`, `sdn.pipeline.stage_code` of the train
    stage; None where the caller does not track its code) and no more than `max_steps` steps.

    Any other checkpoint, or one that cannot be read, is moved to `stale_dir` (never resumed), and
    training starts from step 0: a result is never continued by code or settings that did not
    make it."""
    for partial in ckpt_dir.glob(".*.ckpt.tmp"):  # a save cut short by a kill
        partial.unlink(missing_ok=True)
    path = ckpt_dir / LAST_CHECKPOINT
    if not path.exists():
        return None
    try:
        checkpoint = load_checkpoint_file(path)
        found, found_code = checkpoint.get("sdn_fingerprint"), checkpoint.get("sdn_code")
        step = int(checkpoint.get("global_step", 0))
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside
        found, why = "unreadable", f"cannot be read ({type(err).__name__}: {str(err)[:200]})"
    else:
        if found != fingerprint:
            why = f"was made with a different configuration ({found} != {fingerprint})"
        elif found_code != code:
            why = (f"was made by other code (the train stage's code deps hash to {code}, the "
                   f"checkpoint's to {found_code})")
        elif max_steps is not None and step > max_steps:
            why = f"went on to step {step}, past train.max_steps = {max_steps}"
        else:
            return path
    stale_dir.mkdir(parents=True, exist_ok=True)
    target = stale_dir / f"{ckpt_dir.name}-{found}.ckpt"
    os.replace(path, target)
    print(f"[sdn] {path} {why}; moved it to {target} and training starts from scratch.")
    return None
