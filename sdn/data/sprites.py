"""sprites: procedurally rendered RGB images with known, independent generative factors.

A sprite (square, ellipse, triangle or heart) of some scale and rotation is drawn in a
colour of full saturation at an integer pixel position on a black background. Factors:

=========  ==============================================================================
shape      square, ellipse, triangle, heart (the first `size` of them)
scale      0.6 .. 1.0 of the base size (a fifth of the image)
rotation   0° .. 90° (exclusive), so no two values look alike for any of the four shapes
x, y       pixel centre, spread over the positions where the sprite fits
hue        0 .. 1 (exclusive) around the colour wheel
=========  ==============================================================================

Edges are anti-aliased by 4×4 supersampling; colours are blended with exact integer
arithmetic, so re-rendering the stored labels gives the stored image bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdn.data.source import (
    Batches,
    DatasetContent,
    DatasetSettings,
    OfflineSource,
    SplitSource,
    val_fraction,
    val_mask,
    val_seed,
)
from sdn.schema import AT_LEAST_1, Range, field_range, ranged

FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y", "hue")
SHAPES = ("square", "ellipse", "triangle", "heart")
_SUPERSAMPLE = 4
_BASE = 0.2  # sprite radius at scale 1, as a fraction of the image size


def _radius(image_size: int) -> int:
    """Half-width of the pixel window that holds any sprite (all shapes fit the unit disk)."""
    return math.ceil(_BASE * image_size) + 1


def factor_values(sizes: Mapping[str, int], image_size: int) -> dict[str, list]:
    """The value of each index of each factor, e.g. `{"rotation": [0.0, 11.25, ...], ...}`."""
    radius = _radius(image_size)
    positions = np.round(np.linspace(radius, image_size - 1 - radius, sizes["x"])).astype(int)
    rows = np.round(np.linspace(radius, image_size - 1 - radius, sizes["y"])).astype(int)
    return {
        "shape": list(SHAPES[: sizes["shape"]]),
        "scale": np.linspace(0.6, 1.0, sizes["scale"]).round(6).tolist(),
        "rotation": np.linspace(0.0, 90.0, sizes["rotation"], endpoint=False).round(6).tolist(),
        "x": positions.tolist(),
        "y": rows.tolist(),
        "hue": np.linspace(0.0, 1.0, sizes["hue"], endpoint=False).round(6).tolist(),
    }


def check_sizes(sizes: Mapping[str, int], image_size: int) -> str | None:
    """Why these factor sizes cannot be rendered, or None if they can."""
    if set(sizes) != set(FACTOR_NAMES):
        return f"must give the number of values of each of {', '.join(FACTOR_NAMES)}"
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes.values()):
        return "every factor needs a positive integer number of values"
    if sizes["shape"] > len(SHAPES):
        return f"shape has at most {len(SHAPES)} values ({', '.join(SHAPES)})"
    room = image_size - 2 * _radius(image_size)
    if max(sizes["x"], sizes["y"]) > room:
        return f"x and y have at most {room} distinct pixel positions at image_size {image_size}"
    return None


def sample_factors(sizes: Sequence[int], count: int | None, seed: int) -> np.ndarray:
    """(N, K) factor indices: the full product, or `count` distinct combinations drawn uniformly.

    Drawing uniformly from the product makes the factors independent of each other.
    """
    total = math.prod(sizes)
    flat = (
        np.arange(total) if count is None else np.random.default_rng(seed).choice(total, count, replace=False)
    )
    return np.stack(np.unravel_index(flat, tuple(sizes)), axis=1).astype(np.int64)


def hue_to_rgb(hues: Sequence[float]) -> np.ndarray:
    """(N, 3) uint8 colours of full saturation and value."""
    h = np.asarray(hues, dtype=np.float64) * 6.0
    # Each channel is a trapezoid of the hue: HSV with s = v = 1.
    channels = [np.clip(np.abs((h + shift) % 6.0 - 3.0) - 1.0, 0.0, 1.0) for shift in (0.0, 4.0, 2.0)]
    return np.round(np.stack(channels, axis=1) * 255).astype(np.uint8)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) of the sprite's own frame (unit disk, v down) are inside it."""
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7
    if shape == "ellipse":
        return u**2 + (v / 0.5) ** 2 <= 1.0
    if shape == "triangle":  # equilateral, circumradius 1, pointing up at rotation 0
        normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return np.all([nu * u + nv * v <= 0.5 for nu, nv in normals], axis=0)
    # heart: (x² + y² − 1)³ ≤ x² y³, scaled and centred into the unit disk, pointing down
    x, y = u / 0.72, -v / 0.72 + 0.15
    return (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 <= 0.0


def coverage(shape: str, scale: float, rotation: float, image_size: int) -> np.ndarray:
    """(W, W) int64 count of the supersamples inside the sprite, per pixel of its window."""
    radius = _radius(image_size)
    width = 2 * radius + 1
    offsets = (np.arange(width * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - (radius + 0.5)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    angle = math.radians(rotation)
    size = _BASE * image_size * scale
    u = (math.cos(angle) * dx + math.sin(angle) * dy) / size
    v = (-math.sin(angle) * dx + math.cos(angle) * dy) / size
    inside = _inside(shape, u, v).reshape(width, _SUPERSAMPLE, width, _SUPERSAMPLE)
    return inside.sum(axis=(1, 3)).astype(np.int64)


def render_sprites(factors: np.ndarray, sizes: Mapping[str, int], image_size: int = 64) -> np.ndarray:
    """(N, 3, image_size, image_size) uint8 images of the (N, 6) factor indices `factors`."""
    values = factor_values(sizes, image_size)
    colours = hue_to_rgb(values["hue"]).astype(np.int64)
    radius, area = _radius(image_size), _SUPERSAMPLE**2
    images = np.zeros((len(factors), 3, image_size, image_size), dtype=np.uint8)
    windows: dict[tuple[int, int, int], np.ndarray] = {}
    for image, (shape, scale, rotation, x, y, hue) in zip(images, np.asarray(factors), strict=True):
        key = (shape, scale, rotation)
        if key not in windows:
            windows[key] = coverage(
                SHAPES[shape], values["scale"][scale], values["rotation"][rotation], image_size
            )
        cx, cy = values["x"][x], values["y"][y]
        blend = (colours[hue][:, None, None] * windows[key] + area // 2) // area
        image[:, cy - radius : cy + radius + 1, cx - radius : cx + radius + 1] = blend
    return images


@dataclass(kw_only=True)
class SpritesSettings(DatasetSettings):
    val_fraction: float = val_fraction()
    seed: int = val_seed()
    count: int | None = ranged(None, Range(2))  # images drawn; null: every combination
    factors: dict = ranged(allowed=AT_LEAST_1)  # the number of values of each factor


class SpritesSource(OfflineSource):
    """sprites: rendered images of factors drawn uniformly from their product (rendered above)."""

    settings = SpritesSettings
    generator_keys = ("image_size", "factors", "count", "seed")

    def check(self) -> None:
        for factor, size in self.cfg["factors"].items():
            field_range(SpritesSettings, "factors").check(size, f"datasets.{self.name}.factors.{factor}")
        problem = check_sizes(self.cfg["factors"], self.cfg["image_size"])
        self.require(problem is None, "factors", problem or "")
        # labels come in the renderer's order, whatever the order in params.yaml
        self.cfg["factors"] = {name: self.cfg["factors"][name] for name in FACTOR_NAMES}
        total = math.prod(self.cfg["factors"].values())
        count = self.cfg["count"]
        self.require(
            count is None or 2 <= count <= total,
            "count",
            f"must be null (all {total} combinations) or 2..{total}",
        )

    def download(self, raw_dir: Path) -> None:
        sizes = self.cfg["factors"]
        factors = sample_factors(list(sizes.values()), self.cfg["count"], self.cfg["seed"])
        images = render_sprites(factors, sizes, self.cfg["image_size"])
        info = {k: self.cfg[k] for k in self.generator_keys}
        info["values"] = factor_values(sizes, self.cfg["image_size"])
        self.write_arrays(raw_dir, {"images": images, "factors": factors}, info)

    def read(self, raw_dir: Path) -> DatasetContent:
        info, (images, factors) = self.load_arrays(raw_dir, "images", "factors")
        val = val_mask(len(images), float(self.cfg["val_fraction"]), self.cfg["seed"])

        def batches(mask: np.ndarray) -> Batches:
            yield images[mask], factors[mask]

        sizes = self.cfg["factors"]
        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(~val), int((~val).sum())),
                "val": SplitSource(lambda: batches(val), int(val.sum())),
            },
            label_names=tuple(sizes),
            label_sizes=tuple(sizes.values()),
            label_values=info["values"],
        )
