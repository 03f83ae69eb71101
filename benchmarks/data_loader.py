"""Images per second of the LMDB loader against an in-memory tensor dataset of the same images,
and what the per-record checksum check costs.

Builds the offline datasets (photos32: 3×32×32, sprites: 3×64×64) into a temporary folder and
times full shuffled passes over their training split at batch 64, with 0 and 2 DataLoader
workers: the LMDB loader as the pipeline reads (every record's CRC checked), the same reads with
the check left out, and the tensors in memory. The loaders alternate pass by pass in the same
process, so machine noise hits all of them; the table gives medians over the passes (ratios are
medians of the per-pass ratios). Run from the repository root:

    python benchmarks/data_loader.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sdn.data.lmdb_store import CRC_BYTES, LMDBImageDataset, open_environment, record_key
from sdn.data.sources import convert_dataset, download_dataset
from sdn.params import dataset_config, load_params

BATCH = 64


class UncheckedDataset(LMDBImageDataset):
    """The pipeline's reader with the per-record CRC check left out: the baseline for its cost."""

    def record(self, index: int) -> bytes:
        if self._pid != os.getpid():
            self._env, self._pid = open_environment(self.path), os.getpid()
        with self._env.begin() as txn:
            return txn.get(record_key(index))[:-CRC_BYTES]


def _loader(dataset: Dataset, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def _pass(loader: DataLoader) -> float:
    """Images per second of one full pass."""
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def compare(datasets: list[Dataset], workers: int, repeats: int) -> list[list[float]]:
    """Images/s of each dataset's loader in each of `repeats` passes, the loaders taking turns."""
    loaders = [_loader(dataset, workers) for dataset in datasets]
    for loader in loaders:  # warm-up: start the workers, touch every page once
        _pass(loader)
    rates: list[list[float]] = [[] for _ in loaders]
    for _ in range(repeats):
        for loader, found in zip(loaders, rates, strict=True):
            found.append(_pass(loader))
    return rates


def _ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-pass ratios: each pair of passes ran side by side."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per loader and setting")
    args = parser.parse_args()
    params = load_params()
    columns = ("dataset", "images", "workers", "checked img/s", "unchecked img/s", "memory img/s",
               "checked/unchecked", "checked/memory")
    print(f"{columns[0]:<10}" + "".join(f"{c:>18}" for c in columns[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("photos32", "sprites"):
            cfg = dataset_config(params, name)
            download_dataset(name, cfg, Path(tmp) / "raw")
            split = convert_dataset(name, cfg, Path(tmp) / "raw", Path(tmp) / "lmdb") / "train"
            checked, unchecked = LMDBImageDataset(split), UncheckedDataset(split)
            images, labels = zip(*(checked[i] for i in range(len(checked))), strict=True)
            memory_set = TensorDataset(torch.stack(images), torch.stack(labels))
            for workers in (0, 2):
                rates = compare([checked, unchecked, memory_set], workers, args.repeats)
                cells = (f"{len(checked)}", f"{workers}", *(f"{statistics.median(r):.0f}" for r in rates),
                         f"{_ratio(rates[0], rates[1]):.3f}", f"{_ratio(rates[0], rates[2]):.2f}")
                print(f"{name:<10}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
