"""Where each stage reads and writes, and the wrapper that gives stages clean errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")


def raw_dir(dataset: str) -> Path:
    return DATA / "raw" / dataset


def lmdb_dir(dataset: str) -> Path:
    return DATA / "lmdb" / dataset


def checkpoint_dir(experiment: str) -> Path:
    return DATA / "checkpoints" / experiment


def metrics_dir(experiment: str) -> Path:
    return METRICS / experiment


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, or made with another configuration."""


def run_stage(main: Callable[[str], None], usage: str) -> None:
    """Run `main(name)` with the single command-line argument; known failures exit with a
    one-paragraph message instead of a traceback."""
    from sdn.config import ConfigError
    from sdn.data import DataError

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: {usage}")
    try:
        main(sys.argv[1])
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLossError, CheckpointError) as err:
        sys.exit(f"error: {err}")
