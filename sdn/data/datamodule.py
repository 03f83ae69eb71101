"""A Lightning DataModule over a converted dataset (`data/lmdb/<dataset>/{train,val}`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from sdn.data.lmdb_store import LMDBImageDataset, SplitMetadata, convert_hint, open_split
from sdn.errors import DatasetError, DatasetNotFoundError

SPLITS = ("train", "val")


class EpochSampler(Sampler[tuple[int, bool]]):
    """Yields `(index, flip)` pairs: the order and the flips are drawn from (seed, epoch).

    Drawn here, in the main process, rather than in the workers, the batches and their flips
    are the same for any `num_workers`. The epoch advances by itself after each pass; Lightning
    also sets it with `set_epoch` at the start of every epoch.
    """

    def __init__(self, size: int, *, shuffle: bool, flip: bool, seed: int = 0) -> None:
        self.size, self.shuffle, self.flip, self.seed = size, shuffle, flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        flips = rng.random(self.size) < 0.5 if self.flip else np.zeros(self.size, dtype=bool)
        return iter(zip(order.tolist(), flips.tolist(), strict=True))


class ImageDataModule(pl.LightningDataModule):
    """Train and validation batches `(images, labels)` of a dataset converted by `stages/convert.py`.

    Images are uint8 (B, C, H, W) unless `transform` (applied to each uint8 image) changes
    them; labels are int64 (B, K), K = 0 for datasets without labels. `flip` randomly mirrors
    training images horizontally. Shuffling and flips are deterministic given `seed`.
    `image_shape`, if given, is checked against the data (C, H, W). `dataset` (by default the
    folder's name, as in `data/lmdb/<dataset>`) must be the dataset the splits were converted for.
    """

    def __init__(
        self,
        data_dir: Path | str,
        batch_size: int,
        num_workers: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
        flip: bool = False,
        seed: int = 0,
        image_shape: tuple[int, int, int] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        dataset: str | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.dataset_name = dataset or self.data_dir.name
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transform, self.flip, self.seed = transform, flip, seed
        self.pin_memory, self.drop_last = pin_memory, drop_last
        # opened (and checked) now, to fail early, before training
        self._datasets = {split: self._open(split) for split in SPLITS}
        self._meta: dict[str, SplitMetadata] = {split: data.meta for split, data in self._datasets.items()}
        self._check(image_shape)

    def _open(self, split: str) -> LMDBImageDataset:
        path = self.data_dir / split
        if not path.exists():
            raise DatasetNotFoundError(f"{path} not found: build it with {convert_hint(path)}.")
        return open_split(self.data_dir, split, self.dataset_name, transform=self.transform)

    def _check(self, image_shape: tuple[int, int, int] | None) -> None:
        train, val = self._meta["train"], self._meta["val"]
        rebuild = convert_hint(self.data_dir / "train")
        if (train.shape, train.label_names) != (val.shape, val.label_names):
            raise DatasetError(
                f"{self.data_dir}: train and val disagree (shapes {train.shape} / {val.shape}, labels "
                f"{train.label_names} / {val.label_names}); rebuild it with {rebuild}."
            )
        if image_shape is not None and tuple(image_shape) != train.shape:
            raise DatasetError(
                f"{self.data_dir} holds {train.shape} images but {tuple(image_shape)} are expected: fix "
                f"image_size / channels in params.yaml or rebuild it with {rebuild}."
            )

    @property
    def metadata(self) -> dict[str, Any]:
        """Shape, labels (names, sizes, value names) and the count of each split."""
        train = self._meta["train"]
        return {
            "dataset": train.dataset,
            "shape": list(train.shape),
            "dtype": "uint8",
            "label_names": list(train.label_names),
            "label_sizes": list(train.label_sizes),
            "label_values": train.label_values,
            "counts": {split: meta.count for split, meta in self._meta.items()},
        }

    def dataset(self, split: str) -> LMDBImageDataset:
        """The `train` or `val` split as a Dataset."""
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool, flip: bool) -> DataLoader:
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), shuffle=shuffle, flip=flip, seed=self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, flip=self.flip)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, flip=False)
