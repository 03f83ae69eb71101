"""photos32: 32×32 RGB patches cut from the photographs bundled with scikit-image and scikit-learn.

Only files that ship inside the installed packages are used (no download). Patches are cut on
a regular grid from each photograph at its full size and at integer box-filtered reductions;
the arithmetic is exact integer arithmetic, so the same installed packages give the same bytes
on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdn.data.source import Batches, DatasetContent, DatasetSettings, OfflineSource, SplitSource
from sdn.schema import AT_LEAST_1, ranged, type_ok


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]  # the left view: the right one is nearly the same photo


def _sklearn(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


# Natural RGB photographs that the installed packages carry (no pooch download needed).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _motorcycle,
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


def load_photo(name: str) -> np.ndarray:
    """A bundled photograph as (H, W, 3) uint8."""
    image = np.asarray(PHOTOS[name]())
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"photo {name!r} is {image.dtype} {image.shape}, expected (H, W, 3) uint8")
    return image


def box_reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor`×`factor` blocks with round-half-up integer arithmetic (exact, portable)."""
    if factor == 1:
        return image
    height, width = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:height, :width].reshape(height // factor, factor, width // factor, factor, -1)
    area = factor * factor
    return ((blocks.astype(np.int64).sum(axis=(1, 3)) + area // 2) // area).astype(np.uint8)


def cut_patches(
    photos: Sequence[str], size: int, stride: int, reductions: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Patches (N, 3, size, size) uint8 and their origins (N, 4): photo index, reduction, y, x."""
    patches, origins = [], []
    for photo_index, name in enumerate(photos):
        photo = load_photo(name)
        for factor in reductions:
            image = box_reduce(photo, factor)
            for y in range(0, image.shape[0] - size + 1, stride):
                for x in range(0, image.shape[1] - size + 1, stride):
                    patches.append(image[y : y + size, x : x + size].transpose(2, 0, 1))
                    origins.append((photo_index, factor, y, x))
    return np.stack(patches), np.array(origins, dtype=np.int64)


@dataclass(kw_only=True)
class Photos32Settings(DatasetSettings):
    photos: list  # names of PHOTOS
    val_photos: list  # those of `photos` whose patches make the validation split
    stride: int = ranged(allowed=AT_LEAST_1)
    reductions: list = ranged(allowed=AT_LEAST_1, factory=lambda: [1])


class Photos32Source(OfflineSource):
    """photos32: patches of bundled photographs; validation photographs given by name."""

    settings = Photos32Settings
    generator_keys = ("photos", "image_size", "stride", "reductions")

    def check(self) -> None:
        known = set(PHOTOS)
        for key in ("photos", "val_photos"):
            unknown = [p for p in self.cfg[key] if p not in known]
            self.require(
                not unknown, key, f"unknown photo(s) {unknown}; bundled: {', '.join(PHOTOS)}"
            )
        self.require(
            len(set(self.cfg["photos"])) == len(self.cfg["photos"]), "photos", "lists a photo twice"
        )
        val_photos = set(self.cfg["val_photos"])
        self.require(
            bool(val_photos) and val_photos < set(self.cfg["photos"]),
            "val_photos",
            "must be some, but not all, of `photos`",
        )
        self.require(
            bool(self.cfg["reductions"]) and all(type_ok(r, int) for r in self.cfg["reductions"]),
            "reductions",
            "must be a list of integer factors >= 1",
        )

    def download(self, raw_dir: Path) -> None:
        patches, origins = cut_patches(
            self.cfg["photos"], self.cfg["image_size"], self.cfg["stride"], self.cfg["reductions"]
        )
        info = {k: self.cfg[k] for k in self.generator_keys}
        info["origin_columns"] = ["photo", "reduction", "y", "x"]
        self.write_arrays(raw_dir, {"patches": patches, "origins": origins}, info)

    def read(self, raw_dir: Path) -> DatasetContent:
        _, (patches, origins) = self.load_arrays(raw_dir, "patches", "origins")
        names = self.cfg["photos"]
        val = np.isin(origins[:, 0], [names.index(p) for p in self.cfg["val_photos"]])

        def batches(mask: np.ndarray) -> Batches:
            yield patches[mask], origins[mask][:, :1]

        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(~val), int((~val).sum())),
                "val": SplitSource(lambda: batches(val), int(val.sum())),
            },
            label_names=("photo",),
            label_sizes=(len(names),),
            label_values={"photo": list(names)},
        )
