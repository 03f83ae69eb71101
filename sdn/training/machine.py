"""How a run's `trainer:` settings meet this machine: `devices` fitted to the accelerators that
are visible, and the one line that says what was done.

The release trained its density models on 8 GPUs with DDP. Where fewer are visible, the run keeps
its global batch by accumulation: with V of the D devices asked visible (V dividing D), each of
V processes accumulates D/V micro-batches of `train.batch_size` per optimizer step. Micro-batches
are numbered by their place in the global batch (`StepBatchSampler`, `VAEModule`), so k
processes and k accumulated micro-batches see the same images, draw the same noise and make the
same optimizer steps: free bits per micro-batch, β, the learning-rate schedule and EMA stay the
configured run's. The configuration fingerprint counts micro-batches per step, not how they are
split, so a checkpoint resumes on any machine.

`trainer.accelerator: cpu` counts as one device (the environment variable `SDN_CPU_DEVICES` sets
another count, to run DDP on CPU processes). A run that asks for GPUs (several devices or mixed
precision, with `accelerator: auto` or `gpu`) on a machine without one stops with a
`ConfigError`: a paper run never falls back to the CPU by accident.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from sdn.config import ExperimentConfig
from sdn.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MIXED_PRECISIONS = ("16-mixed", "bf16-mixed")
CPU_DEVICES = "SDN_CPU_DEVICES"
# float16 autocast is a GPU mode: on a CPU such a run trains in float32, as evaluation does there
CPU_PRECISION = {"16-mixed": "32-true"}


@dataclass(frozen=True)
class MachineFit:
    """What training runs with on this machine: `processes` DDP processes on `accelerator`, each
    accumulating `micro_batches` micro-batches per optimizer step, under `precision`. `summary`
    is the line that says what differs from the configuration (None where nothing does).
    `launches_ranks`: several processes on this machine alone, which the process that starts the
    run launches (`sdn.training.processes.run_ranks`)."""

    accelerator: str
    processes: int | str  # a string only where `trainer.devices` is one Lightning reads ("auto", "0,1")
    micro_batches: int
    precision: str
    strategy: str
    summary: str | None = None
    launches_ranks: bool = False

    def run_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """`cfg` as this machine runs it: devices, strategy and accumulation fitted. The precision
        stays the configured one (it belongs to the experiment; the Trainer gets `precision`)."""
        trainer = dataclasses.replace(
            cfg.trainer, accelerator=self.accelerator, devices=self.processes, strategy=self.strategy
        )
        train = dataclasses.replace(cfg.train, accumulate_grad_batches=self.micro_batches)
        return dataclasses.replace(cfg, trainer=trainer, train=train)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cpu_devices(key: str) -> int:
    value = os.environ.get(CPU_DEVICES, "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{CPU_DEVICES}={value!r}: expected a positive number of CPU processes ({key}).")
    return int(value)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('ch') else 's'}"


def _asks_for_gpus(cfg: ExperimentConfig, key: str) -> list[str]:
    """The settings of `cfg` that only make sense on GPUs, as `key.name: value`."""
    trainer, wants = cfg.trainer, []
    if isinstance(trainer.devices, int) and trainer.devices > 1:
        wants.append(f"{key}.devices: {trainer.devices}")
    if str(trainer.precision) in MIXED_PRECISIONS:
        wants.append(f"{key}.precision: {trainer.precision}")
    return wants


def fit_to_machine(
    cfg: ExperimentConfig, gpus: int | None = None, cpu_devices: int | None = None
) -> MachineFit:
    """How experiment `cfg` trains on this machine (`gpus` CUDA devices, by default the visible
    ones; `cpu_devices` what `accelerator: cpu` counts as, by default `SDN_CPU_DEVICES` or 1).

    Raises a ConfigError when the machine cannot run it as configured: GPUs asked for and none
    visible, or a visible count that does not divide `trainer.devices` (the message names the
    counts that would)."""
    trainer, train = cfg.trainer, cfg.train
    key = f"experiments.{cfg.name}.trainer"
    if trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"{key}.accelerator: {trainer.accelerator!r} is not supported; use one of "
                          f"{', '.join(ACCELERATORS)}.")
    gpus = visible_gpus() if gpus is None else gpus
    precision, notes = str(trainer.precision), []
    if trainer.accelerator == "cpu":
        accelerator = "cpu"
        visible = _cpu_devices(key) if cpu_devices is None else cpu_devices
        where = "accelerator cpu (one device)" if visible == 1 else f"{visible} CPU devices ({CPU_DEVICES})"
        if precision in CPU_PRECISION:
            notes.append(f"{precision} is a GPU precision: training in {CPU_PRECISION[precision]} on the CPU")
            precision = CPU_PRECISION[precision]
    elif gpus > 0:
        accelerator, visible, where = "gpu", gpus, f"{_plural(gpus, 'GPU')} visible"
    elif trainer.accelerator != "auto" or _asks_for_gpus(cfg, key):
        raise ConfigError(_no_gpu(cfg, key))
    else:
        accelerator, visible, where = "cpu", 1, "no GPU visible"

    asked = trainer.devices
    if not isinstance(asked, int) or trainer.num_nodes > 1:
        # a device list or "auto" is Lightning's to read, and a multi-node run its launcher's
        return MachineFit(accelerator, asked, train.accumulate_grad_batches, precision, trainer.strategy,
                          _summary(cfg.name, notes))
    if visible >= asked:
        processes, micro_batches = asked, train.accumulate_grad_batches
    elif asked % visible:
        raise ConfigError(_no_divisor(asked, visible, accelerator, key))
    else:
        processes, micro_batches = visible, train.accumulate_grad_batches * asked // visible
        global_batch = train.batch_size * asked * train.accumulate_grad_batches
        share = _plural(micro_batches, "micro-batch") + f" of {train.batch_size}"
        if processes > 1:
            share = f"{processes} processes x {share}"
        notes.insert(0, f"{asked} devices asked, {where}: {share} per step (global batch {global_batch}, "
                        "as configured)")
    if processes == 1:
        strategy = "auto" if asked > 1 else trainer.strategy
    else:  # the processes are launched by sdn.training.processes, never spawned by Lightning
        strategy = "ddp" if trainer.strategy in ("auto", "ddp_spawn") else trainer.strategy
    return MachineFit(accelerator, processes, micro_batches, precision, strategy, _summary(cfg.name, notes),
                      launches_ranks=processes > 1)


def _no_gpu(cfg: ExperimentConfig, key: str) -> str:
    """Why `cfg` does not run here without a GPU, and how it would run on the CPU."""
    trainer, train = cfg.trainer, cfg.train
    wants = _asks_for_gpus(cfg, key) or [f"{key}.accelerator: {trainer.accelerator}"]
    per_step = (trainer.devices if isinstance(trainer.devices, int) else 1) * train.accumulate_grad_batches
    on_cpu = f"one process, {_plural(per_step, 'micro-batch')} of {train.batch_size} per step"
    if str(trainer.precision) in CPU_PRECISION:
        on_cpu += f", in {CPU_PRECISION[str(trainer.precision)]}"
    return (
        f"{' and '.join(wants)} ask{'s' if len(wants) == 1 else ''} for GPUs, but this machine has none "
        f"that torch can use: run it on a GPU machine, or set {key}.accelerator: cpu to run it anyway on "
        f"the CPU ({on_cpu})."
    )


def _no_divisor(asked: int, visible: int, accelerator: str, key: str) -> str:
    """Why `visible` devices cannot keep the global batch of `asked`, and which counts would."""
    counts = [n for n in range(visible, 0, -1) if asked % n == 0]
    choices = f"{', '.join(map(str, counts[:-1]))} or {counts[-1]}" if len(counts) > 1 else str(counts[0])
    if accelerator == "cpu":
        how, what = f"set {CPU_DEVICES} to {choices}", "CPU devices"
    else:
        example = ",".join(map(str, range(counts[0])))
        how, what = f"make {choices} visible, e.g. CUDA_VISIBLE_DEVICES={example}", "GPUs"
    return (f"{key}.devices: {asked} asked, but {visible} {what} do not divide {asked}, so the global batch "
            f"cannot be kept: {how}.")


def _summary(name: str, notes: list[str]) -> str | None:
    return f"{name}: {'; '.join(notes)}" if notes else None
