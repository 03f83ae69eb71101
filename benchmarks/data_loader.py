"""Images per second of the LMDB loader against an in-memory tensor dataset of the same images.

Builds the offline datasets (photos32: 3×32×32, sprites: 3×64×64) into a temporary folder and
times full shuffled passes over their training split at batch 64, with 0 and 2 DataLoader
workers. The two loaders alternate pass by pass in the same process, so machine noise hits both;
the table gives medians over the passes. Run from the repository root:

    python benchmarks/data_loader.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sdn.config import dataset_config, load_params
from sdn.data import LMDBImageDataset, convert_dataset, download_dataset

BATCH = 64


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


def compare(
    lmdb_set: LMDBImageDataset, memory_set: TensorDataset, workers: int, repeats: int
) -> tuple[float, ...]:
    """Median images/s of both loaders and the median of their per-pass ratio."""
    loaders = _loader(lmdb_set, workers), _loader(memory_set, workers)
    for loader in loaders:  # warm-up: start the workers, touch every page once
        _pass(loader)
    lmdb_rates, memory_rates = [], []
    for _ in range(repeats):
        lmdb_rates.append(_pass(loaders[0]))
        memory_rates.append(_pass(loaders[1]))
    ratios = [a / b for a, b in zip(lmdb_rates, memory_rates, strict=True)]
    return statistics.median(lmdb_rates), statistics.median(memory_rates), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per loader and setting")
    args = parser.parse_args()
    params = load_params()
    columns = ("dataset", "images", "workers", "LMDB img/s", "memory img/s", "LMDB/memory")
    print(f"{columns[0]:<10}" + "".join(f"{c:>14}" for c in columns[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("photos32", "sprites"):
            cfg = dataset_config(params, name)
            download_dataset(name, cfg, Path(tmp) / "raw")
            lmdb_set = LMDBImageDataset(
                convert_dataset(name, cfg, Path(tmp) / "raw", Path(tmp) / "lmdb") / "train"
            )
            images, labels = zip(*(lmdb_set[i] for i in range(len(lmdb_set))), strict=True)
            memory_set = TensorDataset(torch.stack(images), torch.stack(labels))
            for workers in (0, 2):
                lmdb_rate, memory_rate, ratio = compare(lmdb_set, memory_set, workers, args.repeats)
                cells = (
                    f"{len(lmdb_set)}",
                    f"{workers}",
                    f"{lmdb_rate:.0f}",
                    f"{memory_rate:.0f}",
                    f"{ratio:.2f}",
                )
                print(f"{name:<10}" + "".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
