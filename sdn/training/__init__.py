"""Training: the Lightning module that wraps either VAE, and the pieces that make runs resumable.

- `module`: `VAEModule` (seeded micro-batches, the model's own loss, EMA weights, optimiser and
  schedule, validation) and `load_ema_model`, the weights evaluation and sampling use;
- `checkpoints`: atomic checkpoint writes, saves every N steps, resuming only a checkpoint of the
  same configuration (`config_fingerprint`);
- `curves`: train.csv, val.csv and live.json, written while the run goes;
- `machine`: `fit_to_machine`, how a run's `devices` meet the accelerators this machine has (the
  global batch kept by accumulation), and its refusal to run a GPU preset without a GPU;
- `processes`: `run_ranks`, the processes of a DDP run launched and stopped together;
- `progress`: the training progress bar, optimizer steps out of `max_steps`;
- `run`: `train_experiment`, the whole run that `stages/train.py` calls.

The data, their order (`StepBatchSampler`, `ShardSampler`) and the flips come from
`sdn.data.datamodule`. The random draws of each micro-batch (flips, posterior noise) are seeded
by the micro-batch's place in the run, so resumed, distributed and accumulated runs draw the same.
"""

from typing import Any

# Each name is served from its module on first use, so that a stage importing one piece (the
# release import needs the fingerprint) neither loads nor depends on the others: dvc.yaml lists
# each stage's modules.
__all__ = [
    "LAST_CHECKPOINT",
    "TRAIN_COLUMNS",
    "VAL_COLUMNS",
    "AtomicCheckpointIO",
    "LiveCurves",
    "MachineFit",
    "ShardSampler",
    "StepBatchSampler",
    "StepCheckpoint",
    "VAEModule",
    "config_fingerprint",
    "count_parameters",
    "fit_to_machine",
    "load_checkpoint_file",
    "load_ema_model",
    "micro_batches_per_step",
    "noise_seed",
    "resumable_checkpoint",
    "run_ranks",
    "train_experiment",
]


def __getattr__(name: str) -> Any:
    if name in ("ShardSampler", "StepBatchSampler"):
        from sdn.data import datamodule

        return getattr(datamodule, name)
    if name in ("LAST_CHECKPOINT", "AtomicCheckpointIO", "StepCheckpoint", "config_fingerprint",
                "load_checkpoint_file", "micro_batches_per_step", "resumable_checkpoint"):
        from sdn.training import checkpoints

        return getattr(checkpoints, name)
    if name in ("TRAIN_COLUMNS", "VAL_COLUMNS", "LiveCurves"):
        from sdn.training import curves

        return getattr(curves, name)
    if name in ("VAEModule", "count_parameters", "load_ema_model", "noise_seed"):
        from sdn.training import module

        return getattr(module, name)
    if name in ("MachineFit", "fit_to_machine"):
        from sdn.training import machine

        return getattr(machine, name)
    if name == "run_ranks":
        from sdn.training import processes

        return processes.run_ranks
    if name == "train_experiment":
        from sdn.training import run

        return run.train_experiment
    raise AttributeError(f"module 'sdn.training' has no attribute {name!r}")
