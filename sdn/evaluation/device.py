"""Where and at what precision the evaluate and sample stages run: the experiment's `trainer:`
settings, read the way Lightning reads them for training.

Evaluation runs in one process on one device: with `devices: 8` it uses the first GPU only. The
importance-weighted NLL is a sum over images with no gradient, so DDP would only split the
images; one GPU evaluates a paper-scale test set in hours, and a single process keeps the
metrics file and the noise each image sees independent of the machine's GPU count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sdn.config import TrainerConfig
from sdn.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("auto", "cpu", *GPU_ACCELERATORS)


def _first_index(devices: int | str | list[int]) -> int:
    """The GPU index a `devices` value starts with: 8 or "auto" → 0, "2,3" or [2, 3] → 2."""
    if isinstance(devices, list):
        return int(devices[0]) if devices else 0
    if isinstance(devices, str):
        first = devices.split(",")[0].strip()
        return int(first) if first.isdigit() and "," in devices else 0
    return 0


def select_device(
    accelerator: str, devices: int | str | list[int] = 1, cuda_available: bool | None = None
) -> torch.device:
    """The torch device for `trainer.accelerator` (auto | cpu | gpu | cuda).

    `auto` takes the first GPU when CUDA is available and the CPU otherwise; `gpu` and `cuda`
    insist on a GPU. `cuda_available` defaults to `torch.cuda.is_available()`.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator: {accelerator!r} is not supported by evaluation and sampling; "
            f"use one of {', '.join(ACCELERATORS)}."
        )
    if accelerator == "cpu" or (accelerator == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ConfigError(
            f"trainer.accelerator: {accelerator!r} asks for a GPU but CUDA is not available on this "
            "machine; set it to auto (uses the GPU where there is one) or cpu."
        )
    return torch.device("cuda", _first_index(devices))


def experiment_device(trainer: TrainerConfig) -> torch.device:
    """The device an experiment's evaluate and sample stages run on."""
    return select_device(trainer.accelerator, trainer.devices)


def autocast_dtype(precision: int | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a Lightning precision string, or None for plain fp32.

    `16-mixed` autocasts to float16 on a GPU only: float16 autocast on a CPU is slow and not
    what Lightning trains with there, so a CPU evaluates such a run in fp32. `bf16-mixed`
    autocasts to bfloat16 on either. Every other precision evaluates in fp32.
    """
    precision = str(precision)
    if precision == "16-mixed":
        return torch.float16 if device.type == "cuda" else None
    if precision == "bf16-mixed":
        return torch.bfloat16
    return None


# what each precision asks for, as `precision_used` names it
PRECISION_MEANS = {"32": "float32", "32-true": "float32", "16-mixed": "float16 autocast",
                   "bf16-mixed": "bfloat16 autocast"}


def precision_used(precision: int | str, device: torch.device) -> str:
    """The arithmetic `precision_context` really uses on `device`, for the logs: `float32`,
    `float16 autocast` or `bfloat16 autocast`, followed by the run's precision where that asks for
    something else (`float32, not trainer.precision 16-mixed` on a CPU)."""
    dtype = autocast_dtype(precision, device)
    used = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    if PRECISION_MEANS.get(str(precision)) == used:
        return used
    return f"{used}, not trainer.precision {precision}"


@contextlib.contextmanager
def precision_context(precision: int | str, device: torch.device) -> Iterator[None]:
    """Autocast as the run's precision asks (see `autocast_dtype`), or nothing."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
