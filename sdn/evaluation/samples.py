"""Pictures of a trained model: sample grids, latent interpolation, neighbourhoods, nearest
training images, reconstructions and latent traversals. Each returns image tensors in [0, 1]
(N, C, H, W) on the model's device; `save_grid` writes them as one titled, enlarged PNG grid atomically."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from sdn.atomic import atomic_write

# Pictures are enlarged so that each image is at least this many pixels on a side (nearest
# neighbour, an integer factor of at least 3): a 32x32 sample shown at its own size cannot be judged.
MIN_SHOWN_SIZE = 96
TITLE_HEIGHT = 30


def upscale_factor(image_size: int) -> int:
    """The integer nearest-neighbour factor for images `image_size` pixels high: at least 3, and
    enough to show each image at `MIN_SHOWN_SIZE` pixels or more."""
    return max(3, math.ceil(MIN_SHOWN_SIZE / image_size))


def grid_picture(images: Tensor, nrow: int, title: str | None = None, scale: int = 1) -> Image.Image:
    """Images in [0, 1] as one grid, `nrow` per row on a white ground (torchvision's `make_grid`,
    2-pixel padding), enlarged `scale` times by nearest neighbour (every pixel becomes a
    `scale` x `scale` block: nothing is smoothed), under a white band holding `title`."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    images = images.detach().float().clamp(0, 1).cpu()
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    # torchvision's save_image rounding: x * 255 + 0.5, clamped, truncated
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if title is None:
        return picture
    canvas = Image.new("RGB", (picture.width, picture.height + TITLE_HEIGHT), "white")
    canvas.paste(picture.convert("RGB"), (0, TITLE_HEIGHT))
    font = ImageFont.load_default(size=18)
    ImageDraw.Draw(canvas).text((6, TITLE_HEIGHT // 2), title, fill="black", font=font, anchor="lm")
    return canvas


def save_grid(images: Tensor, path: Path, nrow: int, title: str | None = None, scale: int = 1) -> None:
    """Write images in [0, 1] as one PNG grid (`grid_picture`), atomically."""
    picture = grid_picture(images, nrow, title, scale)
    atomic_write(path, lambda tmp: picture.save(tmp, format="png"))


@torch.no_grad()
def sample_grid(model, n: int, temperature: float) -> Tensor:
    """`n` samples at `temperature`, as images in [0, 1]."""
    return model.obs.postprocess(model.sample(n, temperature))


@torch.no_grad()
def interpolate_density(model, x_pair: Tensor, layers: int, steps: int, temperature: float) -> Tensor:
    """As released (`evaluate.py --interpolation`): the latents of ladder layers 0..`layers`
    counted from the top (`layers + 1` of them) are interpolated at i / (steps + 1), i = 1..steps;
    the remaining layers are drawn from the prior at `temperature`. Rows: first image, the `steps`
    interpolants, second image."""
    latents = model.encode(x_pair)[: layers + 1]
    rows = []
    for i in range(1, steps + 1):
        w = i / (steps + 1)
        rows.append([(1 - w) * z[0:1] + w * z[1:2] for z in latents])
    decoded = torch.cat([model.decode(z, temperature=temperature, batch=1) for z in rows])
    return model.obs.postprocess(torch.cat([x_pair[0:1], decoded, x_pair[1:2]]))


@torch.no_grad()
def neighbourhood(model, x: Tensor, fixed_layers: int, n: int, temperature: float) -> Tensor:
    """Keep the top `fixed_layers` latents of each image in `x`, resample the rest `n` times.
    Rows: the image, then its `n` neighbours."""
    rows = []
    for image in x:
        latents = [z.expand(n, *z.shape[1:]) for z in model.encode(image[None])[:fixed_layers]]
        rows.append(torch.cat([image[None], model.decode(latents, temperature=temperature, batch=n)]))
    return model.obs.postprocess(torch.cat(rows))


@torch.no_grad()
def nearest_training_images(
    samples: Tensor, training_chunks: Iterable[Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """For each sample (images in [0, 1]) its `k` nearest training images by L2 distance, streamed
    over chunks of training images (so any training set size fits in memory).
    Returns (indices (S, k), distances (S, k))."""
    flat_samples = samples.flatten(1).float()  # on the samples' device; the running best on the CPU
    best_d = torch.full((len(samples), k), float("inf"))
    best_i = torch.zeros((len(samples), k), dtype=torch.long)
    start = 0
    for chunk in training_chunks:
        d = torch.cdist(flat_samples, chunk.flatten(1).float().to(flat_samples.device)).cpu()
        d_all = torch.cat([best_d, d], dim=1)
        i_all = torch.cat([best_i, torch.arange(start, start + len(chunk)).expand(len(samples), -1)], dim=1)
        best_d, order = d_all.topk(k, dim=1, largest=False)
        best_i = i_all.gather(1, order)
        start += len(chunk)
    return best_i, best_d


@torch.no_grad()
def reconstructions(model, x: Tensor) -> Tensor:
    """Inputs and their reconstructions (posterior mean → observation mode), interleaved rows."""
    recon = model.decode(model.encode(x))
    return model.obs.postprocess(torch.stack([x, recon], dim=1).flatten(0, 1))


@torch.no_grad()
def traversals(model, x: Tensor, values: tuple[float, ...] = (-3, -2, -1, 0, 1, 2, 3)) -> Tensor:
    """One row per latent dimension: the image, then the code with that dimension set to each
    value in `values`."""
    z = model.encode(x[0:1])
    rows = []
    for dim in range(z.shape[1]):
        codes = z.repeat(len(values), 1)
        codes[:, dim] = torch.tensor(values, dtype=z.dtype)
        rows.append(torch.cat([x[0:1], model.decode(codes)]))
    return model.obs.postprocess(torch.cat(rows))
