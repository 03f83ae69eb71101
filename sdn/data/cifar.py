"""CIFAR-10, python version: a tar of pickled batches of (N, 3072) uint8 rows in R, G, B planes,
read without running anything the pickles could name."""

from __future__ import annotations

import math
import pickle
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from sdn.data.source import Batches, DatasetContent, RemoteSource, SplitSource
from sdn.errors import DatasetError


class Cifar10Source(RemoteSource):
    """CIFAR-10, python version: pickled batches of (N, 3072) uint8 rows in R, G, B planes."""

    def read(self, raw_dir: Path) -> DatasetContent:
        archive = self.archive(raw_dir)
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m.name for m in tar.getmembers() if m.isfile()}
            train = sorted(
                (n for n in members if re.fullmatch(r"data_batch_\d+", n)),
                key=lambda n: int(n.rsplit("_", 1)[1]),
            )
            missing = [n for n in ("batches.meta", "test_batch") if n not in members] + (
                [] if train else ["data_batch_*"]
            )
            if missing:
                raise DatasetError(
                    f"{archive} is not CIFAR-10's python archive: it lacks {', '.join(missing)}."
                )
            classes = [c.decode() for c in self._unpickle(tar, members["batches.meta"])[b"label_names"]]

        def batches(names: list[str]) -> Batches:
            with tarfile.open(archive) as tar:
                for batch_name in names:
                    batch = self._unpickle(tar, members[batch_name])
                    data = np.asarray(batch[b"data"], dtype=np.uint8)
                    if data.ndim != 2 or data.shape[1] != math.prod(self.shape):
                        raise DatasetError(
                            f"{archive}:{batch_name} holds rows of {data.shape[1:]} bytes, "
                            f"not {self.shape} images (datasets.{self.name}.image_size)."
                        )
                    labels = np.asarray(batch[b"labels"], dtype=np.int64)[:, None]
                    yield data.reshape(-1, *self.shape), labels

        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(train)),
                "val": SplitSource(lambda: batches(["test_batch"])),
            },
            label_names=("class",),
            label_sizes=(len(classes),),
            label_values={"class": classes},
        )

    @staticmethod
    def _unpickle(tar: tarfile.TarFile, member: str) -> dict:
        # The archive's checksum has been checked, and still nothing in it may run: see _BatchUnpickler.
        where = f"{tar.name}:{member}"
        with tar.extractfile(member) as handle:
            try:
                batch = _BatchUnpickler(handle, where).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
                raise DatasetError(f"{where} is not a readable CIFAR-10 batch ({error}).") from error
        if not isinstance(batch, dict) or not all(isinstance(k, bytes) for k in batch):
            raise DatasetError(f"{where} is not a CIFAR-10 batch (a dict with bytes keys).")
        data = batch.get(b"data")
        if data is not None and (not isinstance(data, np.ndarray) or data.dtype != np.uint8):
            raise DatasetError(f"{where}: 'data' is not a uint8 array.")
        return batch


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's python batches hold and nothing else.

    The batches are Python 2 pickles of dicts of byte strings, lists of ints and byte strings,
    and one uint8 numpy array; the only globals they name are the three that rebuild that array.
    Any other global (`os.system`, `builtins.eval`, ...) is how a pickle runs code: refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, handle, where: str) -> None:
        super().__init__(handle, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise DatasetError(
                f"{self.where} refers to {module}.{name}, which CIFAR-10's batches never hold: the "
                "archive is not the published one; it is not unpickled (nothing in it was run)."
            )
        return found
