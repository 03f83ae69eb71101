"""Every picture function of `sdn.evaluation.samples` on micro models: shapes, the [0, 1] range,
what each row holds, and `save_grid`'s file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdn.evaluation import samples as pictures
from sdn.models import build_model
from tests.evaluation_workdir import micro_experiment


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def density():
    torch.manual_seed(0)
    return build_model(micro_experiment("photos32-cnn")).eval()


@pytest.fixture(scope="module")
def beta_vae():
    torch.manual_seed(0)
    return build_model(micro_experiment("sprites-cnn")).eval()


def uint8_images(count: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def assert_pictures(images: torch.Tensor, count: int, size: int) -> None:
    assert images.shape == (count, 3, size, size)
    assert images.dtype.is_floating_point
    assert images.min() >= 0 and images.max() <= 1
    # every value is one of the 256 levels the pictures are saved with
    levels = images * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)


def as_pictures(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def test_sample_grid(density):
    grid = pictures.sample_grid(density, 5, temperature=0.8)
    assert_pictures(grid, 5, 8)
    assert not torch.equal(grid[0], grid[1])  # independent draws
    cold = pictures.sample_grid(density, 2, temperature=0.0)
    torch.testing.assert_close(cold[0], cold[1])  # at temperature 0 every latent is the prior mean


def test_interpolation_rows_start_and_end_at_the_inputs(density):
    pair = uint8_images(2, 8)
    steps = 3
    rows = pictures.interpolate_density(density, density.obs.preprocess(pair), layers=1, steps=steps,
                                        temperature=0.0)
    assert_pictures(rows, steps + 2, 8)
    torch.testing.assert_close(rows[0], as_pictures(pair[0]))
    torch.testing.assert_close(rows[-1], as_pictures(pair[1]))
    inner = rows[1:-1]
    assert all(not torch.equal(a, b) for a, b in zip(inner, inner[1:], strict=False))


def test_interpolating_every_latent_leaves_nothing_to_the_temperature(density):
    x = density.obs.preprocess(uint8_images(2, 8))
    depth = len(density.encode(x))

    def interpolate(layers: int, temperature: float) -> torch.Tensor:
        torch.manual_seed(5)  # the same encoding draws each time
        return pictures.interpolate_density(density, x, layers=layers, steps=2, temperature=temperature)

    torch.testing.assert_close(interpolate(depth - 1, 0.0), interpolate(depth - 1, 1.0))
    # with a layer left to the prior, the temperature is used
    assert not torch.equal(interpolate(depth - 2, 0.0), interpolate(depth - 2, 1.0))


def test_neighbourhood_rows_start_with_their_image(density):
    images = uint8_images(2, 8)
    n = 3
    rows = pictures.neighbourhood(density, density.obs.preprocess(images), fixed_layers=1, n=n,
                                  temperature=1.0)
    assert_pictures(rows, 2 * (n + 1), 8)
    for i, image in enumerate(images):
        torch.testing.assert_close(rows[i * (n + 1)], as_pictures(image))
        neighbours = rows[i * (n + 1) + 1 : (i + 1) * (n + 1)]
        assert not torch.equal(neighbours[0], neighbours[1])  # the free layers are redrawn


def test_nearest_training_images_across_chunks():
    generator = torch.Generator().manual_seed(2)
    training = torch.rand(23, 3, 4, 4, generator=generator)
    samples = torch.rand(4, 3, 4, 4, generator=generator)
    samples[1] = training[17]  # a memorised image: its nearest is itself at distance 0
    k = 3
    indices, distances = pictures.nearest_training_images(samples, training.split(5), k)
    assert indices.shape == distances.shape == (4, k)
    brute = ((samples[:, None] - training[None]) ** 2).flatten(2).sum(-1).sqrt()
    want_d, want_i = brute.sort(dim=1)
    assert torch.equal(indices, want_i[:, :k])
    torch.testing.assert_close(distances, want_d[:, :k], atol=1e-5, rtol=1e-5)
    assert indices[1, 0] == 17 and distances[1, 0] < 1e-3
    # the chunking does not matter
    one_chunk, _ = pictures.nearest_training_images(samples, [training], k)
    assert torch.equal(one_chunk, indices)


@pytest.mark.parametrize("model_name", ["density", "beta_vae"])
def test_reconstructions_interleave_inputs_and_reconstructions(model_name, request):
    model = request.getfixturevalue(model_name)
    size = model.cfg.image_size
    images = uint8_images(3, size)
    rows = pictures.reconstructions(model, model.obs.preprocess(images))
    assert_pictures(rows, 6, size)
    torch.testing.assert_close(rows[0::2], as_pictures(images))
    assert not torch.equal(rows[1::2], rows[0::2])  # decoded by the (untrained) model, not copies


def test_traversals_one_row_per_latent_dimension(beta_vae):
    images = uint8_images(2, 64)
    values = (-2.0, 0.0, 2.0)
    rows = pictures.traversals(beta_vae, beta_vae.obs.preprocess(images), values)
    z_size = beta_vae.cfg.z_size
    assert_pictures(rows, z_size * (len(values) + 1), 64)
    width = len(values) + 1
    for dim in range(z_size):
        torch.testing.assert_close(rows[dim * width], as_pictures(images[0]))  # only the first image
        row = rows[dim * width + 1 : (dim + 1) * width]
        assert not torch.equal(row[0], row[-1]), dim  # moving one latent changes the picture
    # the code's other dimensions stay at the image's own: setting a dimension to the value it
    # already has reproduces the reconstruction
    code = beta_vae.encode(beta_vae.obs.preprocess(images[:1]))
    kept = pictures.traversals(beta_vae, beta_vae.obs.preprocess(images[:1]), (float(code[0, 0]),))
    recon = beta_vae.obs.postprocess(beta_vae.decode(code))
    torch.testing.assert_close(kept[1], recon[0], atol=2 / 255, rtol=0)


@pytest.mark.parametrize(("count", "nrow", "height", "width"), [(5, 3, 4, 6), (8, 8, 8, 8), (2, 4, 3, 3)])
def test_save_grid_writes_a_png_of_the_grid_size(tmp_path: Path, count, nrow, height, width):
    images = torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "out" / "grid.png"
    pictures.save_grid(images, path, nrow=nrow)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        grid = np.array(picture)
    columns, rows = min(nrow, count), math.ceil(count / nrow)
    # torchvision's layout: a 2-pixel white border around and between the images
    assert grid.shape == (rows * (height + 2) + 2, columns * (width + 2) + 2, 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    top_left = torch.from_numpy(grid[2 : 2 + height, 2 : 2 + width]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(top_left, images[0], atol=1 / 255, rtol=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_save_grid_clamps_out_of_range_values(tmp_path: Path):
    images = torch.tensor([-1.0, 2.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    pictures.save_grid(images, tmp_path / "grid.png", nrow=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert (grid[2:4, 2:4] == 0).all() and (grid[2:4, 6:8] == 255).all()


def test_save_grid_failure_keeps_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch):
    path = tmp_path / "grid.png"
    pictures.save_grid(torch.zeros(1, 3, 2, 2), path, nrow=1)
    before = path.read_bytes()

    def full_disk(picture, target, *args, **kwargs):
        Path(target).write_bytes(b"half a png")  # the write starts, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)  # what torchvision writes PNGs with
    with pytest.raises(OSError, match="No space"):
        pictures.save_grid(torch.ones(1, 3, 2, 2), path, nrow=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
