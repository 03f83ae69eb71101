"""DeepMind's 3dshapes.h5: 64×64 images of six factors of variation, with a random validation
split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdn.data.source import (
    Batches,
    DatasetContent,
    RemoteSettings,
    RemoteSource,
    SplitSource,
    val_fraction,
    val_mask,
    val_seed,
)
from sdn.errors import DatasetError

READ_CHUNK = 4096  # images read from the file at a time


@dataclass(kw_only=True)
class Shapes3DSettings(RemoteSettings):
    val_fraction: float = val_fraction()
    seed: int = val_seed()
    train_includes_val: bool = True


class Shapes3DSource(RemoteSource):
    """DeepMind's 3dshapes.h5: 'images' (N, 64, 64, 3) uint8 and 'labels' (N, 6) factor values."""

    FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    settings = Shapes3DSettings

    def read(self, raw_dir: Path) -> DatasetContent:
        import h5py

        path = self.archive(raw_dir)
        channels, height, width = self.shape
        with h5py.File(path, "r") as handle:
            if "images" not in handle or "labels" not in handle:
                raise DatasetError(f"{path} lacks the 'images' or 'labels' dataset of 3dshapes.h5.")
            image_shape, values = handle["images"].shape, handle["labels"][:]
        if image_shape[1:] != (height, width, channels) or values.shape != (
            image_shape[0],
            len(self.FACTORS),
        ):
            raise DatasetError(
                f"{path}: images {image_shape} and labels {values.shape} do not fit "
                f"{len(self.FACTORS)} factors of {(height, width, channels)} images."
            )
        # Factor values are floats (hues in [0, 1), orientations in degrees): index them per factor.
        levels, codes = zip(*(np.unique(column, return_inverse=True) for column in values.T), strict=True)
        codes = np.stack(codes, axis=1).astype(np.int64)
        val = val_mask(len(codes), float(self.cfg["val_fraction"]), self.cfg["seed"])
        train = np.ones_like(val) if self.cfg["train_includes_val"] else ~val

        def batches(mask: np.ndarray) -> Batches:
            with h5py.File(path, "r") as handle:
                images = handle["images"]
                for start in range(0, len(mask), READ_CHUNK):
                    chosen = mask[start : start + READ_CHUNK]
                    if chosen.any():
                        chunk = images[start : start + READ_CHUNK][chosen]
                        yield chunk.transpose(0, 3, 1, 2), codes[start : start + READ_CHUNK][chosen]

        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(train), int(train.sum())),
                "val": SplitSource(lambda: batches(val), int(val.sum())),
            },
            label_names=self.FACTORS,
            label_sizes=tuple(len(v) for v in levels),
            label_values={n: np.round(v, 6).tolist() for n, v in zip(self.FACTORS, levels, strict=True)},
        )
