"""The dot-pattern detector, and the committed offline results checked with it: the sample grids
of the default density runs must not carry a 2-pixel pattern their training images do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdn.evaluation import samples as pictures
from sdn.evaluation.spectrum import nyquist_share

REPO = Path(__file__).resolve().parents[1]
DENSITY_RUNS = ("photos32-sdn", "photos32-cnn", "photos32-long-sdn", "photos32-long-cnn")


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Blurred noise: images with detail only at low frequencies, like photographs."""
    noise = torch.rand(n, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)


def with_dots(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Brighten the even-row, even-column pixels: the pattern a stride-2 transposed convolution
    leaves."""
    dots = torch.zeros_like(images)
    dots[..., ::2, ::2] = strength
    return (images + dots).clamp(0, 1)


def test_pure_two_pixel_patterns_score_one_and_flat_images_zero() -> None:
    parity = torch.arange(8)
    checkerboard = ((parity[:, None] + parity[None, :]) % 2).float().expand(1, 3, 8, 8)
    stripes = (parity % 2).float().expand(1, 3, 8, 8)
    assert nyquist_share(checkerboard).item() == pytest.approx(1.0)
    assert nyquist_share(stripes).item() == pytest.approx(1.0)
    assert nyquist_share(stripes.transpose(-1, -2)).item() == pytest.approx(1.0)
    assert nyquist_share(torch.full((2, 3, 8, 8), 0.3)).tolist() == [0.0, 0.0]


def test_dots_on_smooth_images_are_detected_and_grow_with_their_strength() -> None:
    clean = smooth_images(16)
    shares = [nyquist_share(with_dots(clean, s)).mean().item() for s in (0.0, 0.05, 0.2)]
    assert shares[0] < 0.01
    assert shares[0] < shares[1] < shares[2]
    assert shares[1] > 5 * shares[0]


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="even H and W"):
        nyquist_share(torch.rand(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        nyquist_share(torch.rand(3, 8, 8))


def grid_cells(path: Path, image_size: int, nrow: int) -> torch.Tensor:
    """Cut a committed sample grid (`samples.grid_picture`: a title band, then `nrow` images per
    row with 2-pixel padding, enlarged by `upscale_factor`) back into its images."""
    picture = np.asarray(Image.open(path).convert("RGB"))[pictures.TITLE_HEIGHT :]
    scale = pictures.upscale_factor(image_size)
    small = picture[::scale, ::scale]
    step = image_size + 2
    rows = (small.shape[0] - 2) // step
    cells = [
        small[2 + r * step : 2 + r * step + image_size, 2 + c * step : 2 + c * step + image_size]
        for r in range(rows) for c in range(nrow)
    ]
    return torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).float() / 255.0


def test_grid_cells_are_the_images_that_were_drawn(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(3)) / 255.0
    pictures.save_grid(images, tmp_path / "grid.png", nrow=3, title="t", scale=pictures.upscale_factor(32))
    assert torch.equal(grid_cells(tmp_path / "grid.png", 32, 3), images)


@pytest.mark.parametrize("run", DENSITY_RUNS)
def test_committed_sample_grids_carry_no_dot_pattern(run: str) -> None:
    """The committed grids at every temperature: their images put no more of their power at the
    2-pixel period than a few times what photographs do (about 0.6%); the dotted grids the
    stride-2 output layer gave put 45% there."""
    grids = sorted((REPO / "metrics" / run / "samples").glob("samples_t*.png"))
    assert grids, f"no committed sample grids for {run}: run `make`"
    for grid in grids:
        cells = grid_cells(grid, 32, 8)
        assert len(cells) == 64
        share = nyquist_share(cells).mean().item()
        assert share < 0.03, f"{grid.name}: {share:.1%} of the power at the 2-pixel period"


@pytest.mark.parametrize("run", DENSITY_RUNS)
def test_committed_evaluation_finds_samples_as_smooth_as_the_data(run: str) -> None:
    metrics = json.loads((REPO / "metrics" / run / "eval.json").read_text())
    samples, data = metrics["nyquist_share_samples"], metrics["nyquist_share_data"]
    assert 0 < data < 0.02  # photographs: little power at the 2-pixel period
    assert samples < 3 * data, f"samples {samples:.4f} against data {data:.4f}: a dot pattern"
