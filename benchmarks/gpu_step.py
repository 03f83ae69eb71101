"""What one experiment costs on this GPU: the time of a training micro-batch and of an optimizer
step, peak GPU memory, images per second, and the projected GPU-hours of its part of
`make <dataset>` (training with its validations, then evaluation), at the experiment's own
precision and micro-batch and under bf16-mixed.

The run is the one `make` starts on this machine: one process (sdn/training/machine.py), so an
optimizer step is `trainer.devices x train.accumulate_grad_batches` micro-batches of
`train.batch_size`, then the Adamax update and the EMA average. The model (with its EMA twin and
optimizer state) is built on the device; random images stand in for data. Micro-batches and
updates are timed separately (each to the device's synchronisation, medians of `--repeats`), and
the step is their sum: micro-batches x micro-batch + update. Evaluation is timed as the evaluate
stage calls the model: `evaluate.chunk_size` rows (copies of images) per forward, without
gradients; where that runs out of memory, the largest half that fits is timed and reported.

Projected hours: training `max_steps x step`; validation every `val_every_steps` over its images
(`val_batches x evaluate.batch_size`, or the whole validation split); evaluation `iw_samples` rows
for each of its images (and, for a β-VAE, one row per image its disentanglement scores encode).
Downloading, converting, sampling and the scores' CPU work are left out. Split sizes come from
the converted dataset where there is one, else from the datasets' published sizes below.

    python benchmarks/gpu_step.py cifar10-sdn [--device cuda] [--precision 16-mixed ...]
        [--repeats 3] [--out figures.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdn.config import ExperimentConfig, experiment_config
from sdn.errors import SDNError
from sdn.evaluation.device import precision_context
from sdn.params import load_params
from sdn.training.checkpoints import micro_batches_per_step
from sdn.training.module import VAEModule, count_parameters

# Published split sizes (training, validation), for datasets not converted here: CIFAR-10's
# 50000/10000; GLOW's ImageNet 32x32 (1281149/50000) and CelebA-HQ 256 (27000/3000) TFRecords;
# 3dshapes' 480000 images, of which params.yaml holds out 5% for validation.
PUBLISHED_SPLITS = {
    "cifar10": (50000, 10000),
    "imagenet32": (1281149, 50000),
    "celebahq256": (27000, 3000),
    "3dshapes": (480000, 24000),
}
GIB = 1024**3


def split_sizes(cfg: ExperimentConfig, data_root: Path) -> tuple[int, int] | None:
    """(training, validation) images of the experiment's dataset: converted, else published."""
    from sdn.data.lmdb_store import read_metadata

    lmdb = data_root / "lmdb" / cfg.dataset
    if (lmdb / "train").exists() and (lmdb / "val").exists():
        return read_metadata(lmdb / "train").count, read_metadata(lmdb / "val").count
    return PUBLISHED_SPLITS.get(cfg.dataset)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    """Seconds `work()` takes, up to the device's synchronisation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(cfg: ExperimentConfig, precision: str, device: torch.device, repeats: int) -> dict[str, Any]:
    """The figures of one precision, on a fresh model with its EMA twin and optimizer."""
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, precision=precision))
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):  # built where it trains: no copy of 10^8 weights, initialised there
        module = VAEModule(cfg).to(device)
    # trained as Lightning trains it (`trainer.deterministic`), evaluated as the evaluate stage does
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)
    figures = {"precision": precision, **time_training(module, precision, device, repeats)}
    torch.use_deterministic_algorithms(False)
    # the most the GPU held in training: weights, EMA, optimizer state, a micro-batch's activations
    # (the CPU keeps no such count)
    figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    figures.update(time_evaluation(module.eval_model.eval(), cfg, precision, device))
    figures["eval_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB if on_gpu else None
    return figures


def time_training(module: VAEModule, precision: str, device: torch.device, repeats: int) -> dict[str, Any]:
    """Micro-batch and update times (medians of `repeats`, after one of each to warm up); the step."""
    cfg = module.cfg
    micro_batches = micro_batches_per_step(cfg)
    model, optimizer = module.model.train(), module.configure_optimizers()["optimizer"]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed" and device.type == "cuda")
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    images = torch.randint(0, 256, (cfg.train.batch_size, *shape), dtype=torch.uint8, device=device)

    def micro_batch() -> None:
        with precision_context(precision, device):
            loss = model.loss(model(model.obs.preprocess(images)), step=0).mean() / micro_batches
        scaler.scale(loss).backward()

    def update() -> None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        module.update_ema()

    micro_s, update_s = [], []
    for repeat in range(repeats + 1):  # the first round warms up
        micro, step = timed(device, micro_batch), timed(device, update)
        if repeat:
            micro_s.append(micro)
            update_s.append(step)
    figures = {"micro_batch_s": statistics.median(micro_s), "update_s": statistics.median(update_s)}
    figures["step_s"] = micro_batches * figures["micro_batch_s"] + figures["update_s"]
    figures["images_per_s"] = micro_batches * cfg.train.batch_size / figures["step_s"]
    return figures


def time_evaluation(
    model: torch.nn.Module, cfg: ExperimentConfig, precision: str, device: torch.device
) -> dict[str, Any]:
    """Seconds per row of the evaluate stage's forward (`evaluate.chunk_size` rows, or the largest
    half that fits) and of validation's (`evaluate.batch_size` rows)."""
    ev = cfg.evaluate
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)

    def per_row(rows: int) -> float:
        x = model.obs.preprocess(torch.randint(0, 256, (rows, *shape), dtype=torch.uint8, device=device))

        def forward() -> None:
            with torch.no_grad(), precision_context(precision, device):
                model.elbo(x)

        forward()  # warm-up
        return min(timed(device, forward) for _ in range(2)) / rows

    asked = rows = min(ev.chunk_size, ev.iw_samples * ev.batch_size)
    figures: dict[str, Any] = {}
    while not figures:
        try:
            figures = {"eval_rows": rows, "eval_row_s": per_row(rows)}
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_out_of_memory(error) or rows == 1:
                raise
            rows //= 2
        _free(device)  # out here: the error's traceback no longer holds the failed forward's tensors
    if rows < asked:
        figures["eval_out_of_memory"] = (f"evaluate.chunk_size: {ev.chunk_size} runs out of memory here "
                                         f"({asked} rows); {rows} rows fit")
    figures["val_row_s"] = per_row(min(ev.batch_size, rows))
    return figures


def projected_hours(cfg: ExperimentConfig, figures: dict[str, Any], splits: tuple[int, int] | None) -> dict:
    """GPU-hours of training, its validations and the evaluation, from the measured figures."""
    train, ev = cfg.train, cfg.evaluate
    hours: dict[str, float | None] = {"train": train.max_steps * figures["step_s"] / 3600}
    if splits is None:
        hours.update(validation=None, evaluation=None, total=None)
        return hours
    train_images, val_images = splits
    per_validation = val_images
    if train.val_batches is not None:
        per_validation = min(val_images, train.val_batches * ev.batch_size)
    validations = train.max_steps // train.val_every_steps
    hours["validation"] = validations * per_validation * figures["val_row_s"] / 3600
    evaluated = val_images if ev.max_images is None else min(val_images, ev.max_images)
    rows = evaluated * ev.iw_samples
    if cfg.kind == "disentanglement":  # the scores encode labelled training images
        points = ev.disentanglement_points
        rows += train_images if points is None else min(train_images, points)
    hours["evaluation"] = rows * figures["eval_row_s"] / 3600
    hours["total"] = hours["train"] + hours["validation"] + hours["evaluation"]
    return hours


def benchmark(
    name: str, device: torch.device, precisions: list[str] | None = None, repeats: int = 3,
    params_file: Path = Path("params.yaml"), data_root: Path = Path("data"),
) -> dict[str, Any]:
    """Every figure of experiment `name` on `device`, by precision (default: its own, then bf16-mixed)."""
    cfg = experiment_config(load_params(params_file), name)
    if cfg.trainer.deterministic:  # what Lightning sets for deterministic cuBLAS, before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    own = str(cfg.trainer.precision)
    if device.type == "cpu" and own == "16-mixed":
        own = "32-true"  # what the machine fit trains such a run in on a CPU
    precisions = precisions or list(dict.fromkeys([own, "bf16-mixed"]))
    splits = split_sizes(cfg, data_root)
    result = {
        "experiment": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": None,
        "configured_precision": str(cfg.trainer.precision),
        "micro_batch": cfg.train.batch_size,
        "micro_batches_per_step": micro_batches_per_step(cfg),
        "max_steps": cfg.train.max_steps,
        "splits": list(splits) if splits else None,
        "precisions": {},
    }
    with torch.device("meta"):
        result["parameters"] = count_parameters(VAEModule(cfg).model)
    for precision in precisions:
        try:
            figures = measure(cfg, precision, device, repeats)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            figures = {"precision": precision,
                       "error": f"out of memory at a micro-batch of {cfg.train.batch_size}"}
        else:
            figures["hours"] = projected_hours(cfg, figures, splits)
        finally:
            _free(device)  # the model of this precision goes before the next one is built
        result["precisions"][precision] = figures
    return result


def _format(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    per_step = result["micro_batches_per_step"]
    lines = [f"{result['experiment']} on {result['device']}: {result['parameters']:,} parameters, "
             f"{per_step} micro-batch{'es' if per_step > 1 else ''} of {result['micro_batch']} per step"]
    for precision, figures in result["precisions"].items():
        if "error" in figures:
            lines.append(f"  {precision:<10} {figures['error']}")
            continue
        hours = figures["hours"]
        lines.append(
            f"  {precision:<10} micro-batch {_format(figures['micro_batch_s'])} s, "
            f"step {_format(figures['step_s'])} s, {_format(figures['images_per_s'], 1)} images/s, "
            f"peak {_format(figures['peak_memory_gib'], 1)} GiB; "
            f"GPU-hours: train {_format(hours['train'], 1)}, validation {_format(hours['validation'], 1)}, "
            f"evaluation {_format(hours['evaluation'], 1)}, "
            f"total {_format(hours['total'], 1)}"
        )
        if "eval_out_of_memory" in figures:
            lines.append(f"  {'':<10} {figures['eval_out_of_memory']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--device", default="cuda", help="cuda (the first GPU) or cpu")
    parser.add_argument("--precision", action="append", dest="precisions",
                        help="a precision to measure (repeatable; default: its own, then bf16-mixed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step: no CUDA device is visible; nothing measured (use --device cpu to try it here).",
              file=sys.stderr)
        return 2
    try:
        result = benchmark(args.experiment, torch.device(args.device), args.precisions, args.repeats)
    except SDNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
