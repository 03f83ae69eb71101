"""The one errors module: every deliberate failure is an `SDNError`, and a missing split is the
same error, naming the stage that builds it, whichever reader meets it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import sdn.errors
from sdn.data.datamodule import ImageDataModule
from sdn.data.lmdb_store import LMDBImageDataset, open_split, read_metadata
from sdn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DatasetNotFoundError,
    NonFiniteLossError,
    SDNError,
    did_you_mean,
)


def test_every_error_class_is_an_sdn_error_and_keeps_its_builtin() -> None:
    classes = [c for _, c in inspect.getmembers(sdn.errors, inspect.isclass) if c.__module__ == "sdn.errors"]
    assert len(classes) >= 12 and all(issubclass(c, SDNError) for c in classes)
    # callers that catch the builtin a class refines keep catching it
    assert issubclass(ConfigError, ValueError)
    assert all(issubclass(c, RuntimeError) for c in (DataError, CheckpointError, NonFiniteLossError))
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def _readers(lmdb_dir: Path) -> dict[str, object]:
    """Each way the project opens a split, as a callable that opens `lmdb_dir`'s train split."""
    return {
        "open_split (train, evaluate, sample)": lambda: open_split(lmdb_dir, "train", "demo"),
        "ImageDataModule": lambda: ImageDataModule(lmdb_dir, batch_size=2),
        "LMDBImageDataset": lambda: LMDBImageDataset(lmdb_dir / "train"),
        "read_metadata": lambda: read_metadata(lmdb_dir / "train"),
    }


@pytest.mark.parametrize("state", ["no folder", "empty folder"])
def test_a_missing_split_raises_one_type_on_every_path(tmp_path: Path, state: str) -> None:
    lmdb_dir = tmp_path / "lmdb" / "demo"
    if state == "empty folder":  # e.g. a conversion that never wrote its database
        (lmdb_dir / "train").mkdir(parents=True)
    for reader, open_it in _readers(lmdb_dir).items():
        with pytest.raises(Exception) as info:
            open_it()
        assert type(info.value) is DatasetNotFoundError, f"{reader}: {type(info.value).__name__}"
        assert "dvc repro convert@demo" in str(info.value), f"{reader}: {info.value}"


def test_did_you_mean_suggests_the_closest_name_or_lists_them() -> None:
    assert did_you_mean("lrr", ["batch_size", "lr"]) == " Did you mean 'lr'?"
    assert did_you_mean("zzz", ["b", "a"], "Known keys") == " Known keys: b, a."
    assert did_you_mean("zzz", []) == " Known: none."
    names = ["cifar10", "sprites-sdn"]
    assert did_you_mean("cifar1", names, listed=["cifar10"]) == " Did you mean 'cifar10'?"
    assert did_you_mean("zzz", names, listed=["cifar10"]) == " Known: cifar10."
