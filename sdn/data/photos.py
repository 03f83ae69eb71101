"""photos32: 32×32 RGB patches cut from the photographs bundled with scikit-image and scikit-learn.

Only files that ship inside the installed packages are used (no download). Patches are cut on
a regular grid from each photograph at its full size and at integer box-filtered reductions;
the arithmetic is exact integer arithmetic, so the same installed packages give the same bytes
on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


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
