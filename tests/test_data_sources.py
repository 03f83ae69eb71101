"""Every dataset source end to end: download (loopback server) -> verify -> convert -> read back."""

from __future__ import annotations

import colorsys
import hashlib
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from sdn.data.lmdb_store import LMDBImageDataset, inspect_dataset
from sdn.data.sources import convert_dataset, download_dataset, make_source
from sdn.data.sprites import factor_values, render_sprites
from sdn.errors import ConfigError, DatasetError
from sdn.params import dataset_config, load_params
from tests.dataset_files import cifar_archive, encode_example, tar_archive, tfrecord_file
from tests.network_tools import FileServer, serving

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as httpd:
        yield httpd


def _read_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = LMDBImageDataset(path)
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([x.numpy() for x, _ in items]), np.stack([y.numpy() for _, y in items])










def _roundtrip(name: str, cfg: dict, tmp_path: Path) -> Path:
    download_dataset(name, cfg, tmp_path / "raw")
    return convert_dataset(name, cfg, tmp_path / "raw", tmp_path / "lmdb")


# --- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_archive_reads_back_exactly(server: FileServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batches = {
        n: (rng.integers(0, 256, (k, 3072), dtype=np.uint8), rng.integers(0, 10, k).tolist())
        for n, k in (("data_batch_1", 5), ("data_batch_2", 4), ("test_batch", 3))
    }
    classes = [f"class{i}".encode() for i in range(10)]
    archive = cifar_archive(batches, classes)
    server.files["/cifar-10-python.tar.gz"] = archive
    cfg = {
        "image_size": 32,
        "channels": 3,
        "flip": True,
        "url": server.url("/cifar-10-python.tar.gz"),
        "md5": hashlib.md5(archive).hexdigest(),
    }

    out = _roundtrip("cifar10", cfg, tmp_path)

    images, labels = _read_all(out / "train")
    train = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]])
    # rows are R, G, B planes of 32x32: (C, H, W) without any reordering
    np.testing.assert_array_equal(images, train.reshape(-1, 3, 32, 32))
    assert labels[:, 0].tolist() == batches["data_batch_1"][1] + batches["data_batch_2"][1]
    images, labels = _read_all(out / "val")
    np.testing.assert_array_equal(images.reshape(3, -1), batches["test_batch"][0])
    assert labels[:, 0].tolist() == batches["test_batch"][1]
    meta = LMDBImageDataset(out / "val").meta
    assert meta.label_names == ("class",) and meta.label_sizes == (10,)
    assert meta.label_values["class"][3] == "class3" and meta.source["md5"] == cfg["md5"]


# --- GLOW TFRecords (imagenet32, celebahq256) ----------------------------------------------------


def _glow_shard(images: np.ndarray) -> bytes:
    return tfrecord_file(
        [encode_example({"shape": list(im.shape), "data": [im.tobytes()], "label": [0]}) for im in images]
    )


def test_glow_tfrecord_tar_reads_back_exactly(server: FileServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shards = {
        ("train", 0): rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        ("train", 1): rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        ("validation", 0): rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
    }
    root = "mnt/host/imagenet-oord-tfr"
    totals = {"train": 2, "validation": 1}
    members = {
        f"{root}/{split}/{split}-r05-s-{i:04d}-of-{totals[split]:04d}.tfrecords": _glow_shard(images)
        for (split, i), images in shards.items()
    }
    # the 64x64 shards in the same tar must be ignored at image_size 32
    members[f"{root}/train/train-r06-s-0000-of-0001.tfrecords"] = _glow_shard(
        rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    )
    archive = tar_archive(dict(reversed(members.items())))  # tar order must not matter
    server.files["/glow/imagenet-oord-tfr.tar"] = archive
    cfg = {
        "image_size": 32,
        "channels": 3,
        "url": server.url("/glow/imagenet-oord-tfr.tar"),
        "sha256": hashlib.sha256(archive).hexdigest(),
    }

    out = _roundtrip("imagenet32", cfg, tmp_path)

    images, labels = _read_all(out / "train")
    expected = np.concatenate([shards["train", 0], shards["train", 1]]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(images, expected)
    assert labels.shape == (5, 0)
    images, _ = _read_all(out / "val")
    np.testing.assert_array_equal(images, shards["validation", 0].transpose(0, 3, 1, 2))
    assert inspect_dataset("imagenet32", tmp_path)["splits"]["train"]["count"] == 5

    # a missing shard is reported, not silently skipped
    del members[f"{root}/validation/validation-r05-s-0000-of-0001.tfrecords"]
    incomplete = tar_archive(members)
    (tmp_path / "raw" / "imagenet32" / "imagenet-oord-tfr.tar").write_bytes(incomplete)
    with pytest.raises(DatasetError, match="complete validation split at resolution 32"):
        cfg["sha256"] = hashlib.sha256(incomplete).hexdigest()
        convert_dataset("imagenet32", cfg, tmp_path / "raw", tmp_path / "lmdb")


def test_glow_record_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    shard = _glow_shard(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    raw = tmp_path / "raw" / "celebahq256"
    raw.mkdir(parents=True)
    archive = tar_archive(
        {
            "celeba-tfr/train/train-r08-s-0000-of-0001.tfrecords": shard,
            "celeba-tfr/validation/validation-r08-s-0000-of-0001.tfrecords": shard,
        }
    )
    (raw / "celeba-tfr.tar").write_bytes(archive)
    cfg = {
        "image_size": 256,
        "channels": 3,
        "url": "https://example.invalid/celeba-tfr.tar",
        "sha256": hashlib.sha256(archive).hexdigest(),
    }
    with pytest.raises(DatasetError, match=r"shape \[8, 8, 3\], expected \[256, 256, 3\]"):
        convert_dataset("celebahq256", cfg, tmp_path / "raw", tmp_path / "lmdb")
    assert not (tmp_path / "lmdb" / "celebahq256").exists()


# --- 3dshapes ------------------------------------------------------------------------------------


def _shapes_h5(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    sizes = (2, 2, 2, 2, 3, 3)
    values = [np.linspace(0, 0.9, n) for n in sizes[:3]] + [
        np.linspace(0.75, 1.25, sizes[3]),
        np.arange(sizes[4], dtype=float),
        np.linspace(-30, 30, sizes[5]),
    ]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij"), -1).reshape(-1, 6)
    labels = np.stack([values[k][grid[:, k]] for k in range(6)], axis=1)
    images = np.random.default_rng(0).integers(0, 256, (len(grid), 64, 64, 3), dtype=np.uint8)
    with h5py.File(path, "w") as handle:
        handle["images"], handle["labels"] = images, labels
    return images, grid, sizes


def test_3dshapes_h5_reads_back_with_factor_indices(server: FileServer, tmp_path: Path) -> None:
    images, grid, sizes = _shapes_h5(tmp_path / "3dshapes.h5")
    data = (tmp_path / "3dshapes.h5").read_bytes()
    server.files["/3d-shapes/3dshapes.h5"] = data
    cfg = {
        "image_size": 64,
        "channels": 3,
        "url": server.url("/3d-shapes/3dshapes.h5"),
        "md5": hashlib.md5(data).hexdigest(),
        "val_fraction": 0.25,
        "seed": 3,
    }

    out = _roundtrip("3dshapes", cfg, tmp_path)

    train_images, train_labels = _read_all(out / "train")
    np.testing.assert_array_equal(train_images, images.transpose(0, 3, 1, 2))  # all images train
    np.testing.assert_array_equal(train_labels, grid)
    val_images, val_labels = _read_all(out / "val")
    assert len(val_images) == round(0.25 * len(images))
    rows = [np.flatnonzero((grid == label).all(axis=1))[0] for label in val_labels]
    np.testing.assert_array_equal(val_images, images[rows].transpose(0, 3, 1, 2))
    meta = LMDBImageDataset(out / "train").meta
    assert meta.label_names == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    assert meta.label_sizes == sizes and meta.label_values["orientation"] == [-30.0, 0.0, 30.0]

    held_out = convert_dataset(
        "3dshapes", {**cfg, "train_includes_val": False}, tmp_path / "raw", tmp_path / "held-out"
    )
    train_labels = _read_all(held_out / "train")[1]
    assert len(train_labels) + len(val_labels) == len(grid)
    assert not {tuple(r) for r in train_labels} & {tuple(r) for r in val_labels}


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("cifar10", {"md5": "xyz"}, r"datasets.cifar10.md5: must be 32 hex digits"),
        ("cifar10", {"sha256": None}, r"datasets.cifar10: give exactly one of md5 or sha256"),
        ("cifar10", {"image_size": "32"}, r"datasets.cifar10.image_size: expected int"),
        ("cifar10", {"colour": True}, r"datasets.cifar10.colour: unknown setting"),
        ("photos32", {"val_photos": ["lena"]}, r"datasets.photos32.val_photos: unknown photo"),
        ("photos32", {"val_photos": []}, r"datasets.photos32.val_photos: must be some"),
        (
            "sprites",
            {"factors": {"shape": 5}},
            r"datasets.sprites.factors: must give the number of values of each of shape",
        ),
        ("sprites", {"count": 10**9}, r"datasets.sprites.count: must be null"),
        ("imagenet32", {"image_size": 48}, r"datasets.imagenet32.image_size: GLOW stores powers of two"),
        ("3dshapes", {"val_fraction": 1.5}, r"datasets.3dshapes.val_fraction: must be in \(0, 1\)"),
    ],
)
def test_bad_settings_name_the_key(name: str, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_source(name, {**dataset_config(PARAMS, name), **change})


def test_every_dataset_in_params_yaml_is_valid() -> None:
    for name in PARAMS["datasets"]:
        make_source(name, dataset_config(PARAMS, name))
    with pytest.raises(ConfigError, match="datasets.mnist: no data source"):
        make_source("mnist", {})


# --- photos32 ------------------------------------------------------------------------------------


def test_photos32_is_deterministic_and_split_by_photograph(tmp_path: Path) -> None:
    cfg = dataset_config(PARAMS, "photos32")
    for build in ("a", "b"):
        download_dataset("photos32", cfg, tmp_path / build)
    files = sorted(p.name for p in (tmp_path / "a" / "photos32").iterdir())
    assert files == ["info.json", "origins.npy", "patches.npy"]
    for file in files:
        assert (tmp_path / "a" / "photos32" / file).read_bytes() == (
            tmp_path / "b" / "photos32" / file
        ).read_bytes()

    out = convert_dataset("photos32", cfg, tmp_path / "a", tmp_path / "lmdb")
    again = convert_dataset("photos32", cfg, tmp_path / "b", tmp_path / "lmdb-again")
    for split in ("train", "val"):  # the databases too: DVC sees an unchanged output
        assert (out / split / "data.mdb").read_bytes() == (again / split / "data.mdb").read_bytes()
    train_images, train_photos = _read_all(out / "train")
    val_images, val_photos = _read_all(out / "val")
    names = LMDBImageDataset(out / "val").meta.label_values["photo"]
    assert {names[i] for i in val_photos[:, 0]} == set(cfg["val_photos"])
    assert not {names[i] for i in train_photos[:, 0]} & set(cfg["val_photos"])
    assert 2000 <= len(train_images) <= 10000 and 200 <= len(val_images) <= 1000
    assert train_images.shape[1:] == (3, 32, 32) and train_images.std() > 20  # real, varied content


# --- sprites -------------------------------------------------------------------------------------


def measure_sprites(images: np.ndarray) -> dict[str, np.ndarray]:
    """What the pixels say, knowing only that a sprite is one fully saturated, fully bright colour
    on black with anti-aliased edges: each pixel's brightest channel is the sprite's coverage."""
    pixels = images.astype(np.float64)
    coverage = pixels.max(axis=1) / 255.0
    area = coverage.sum(axis=(1, 2))
    rows = np.arange(images.shape[2])[None, :, None]
    cols = np.arange(images.shape[3])[None, None, :]
    inside = coverage > 0.999  # fully covered pixels carry the exact colour
    mean_rgb = (pixels * inside[:, None]).sum(axis=(2, 3)) / inside.sum(axis=(1, 2))[:, None] / 255.0
    return {
        "x": (coverage * cols).sum(axis=(1, 2)) / area,
        "y": (coverage * rows).sum(axis=(1, 2)) / area,
        "area": area,
        "hue": np.array([colorsys.rgb_to_hsv(*rgb)[0] for rgb in mean_rgb]),
        "inside": inside.sum(axis=(1, 2)),
    }


def assert_sprite_pixels_match_labels(images: np.ndarray, factors: np.ndarray, sizes: dict) -> None:
    measured = measure_sprites(images)
    assert measured["inside"].min() > 10  # every sprite has an interior to read its colour from
    names = list(sizes)
    for factor in ("x", "y"):
        # the centroid separates the positions completely and in order, a few pixels apart
        labels = factors[:, names.index(factor)]
        ranges = [(measured[factor][labels == i].min(), measured[factor][labels == i].max())
                  for i in range(sizes[factor])]
        assert all(high < low for (_, high), (low, _) in pairwise(ranges)), (factor, ranges)
        assert ranges[-1][0] - ranges[0][1] > 20
    # scale: for each shape (which sets the area at scale 1) the area grows strictly with the scale
    # label, as the square of the documented scale 0.6 .. 1.0
    scale_values = np.linspace(0.6, 1.0, sizes["scale"])
    for shape in range(sizes["shape"]):
        of_shape = factors[:, 0] == shape
        by_scale = [measured["area"][of_shape & (factors[:, 1] == i)] for i in range(sizes["scale"])]
        assert all(a.max() < b.min() for a, b in pairwise(by_scale)), shape
        ratios = np.array([a.mean() for a in by_scale]) / by_scale[-1].mean()
        np.testing.assert_allclose(ratios, (scale_values / scale_values[-1]) ** 2, rtol=0.05)
    # hue: the colour of the interior is label / sizes["hue"] around the wheel; classes distinct
    labels = factors[:, names.index("hue")]
    error = np.abs((measured["hue"] - labels / sizes["hue"] + 0.5) % 1.0 - 0.5)
    assert error.max() < 0.01
    centres = np.array([measured["hue"][labels == i].mean() for i in range(sizes["hue"])])
    gaps = np.abs((centres[:, None] - centres[None, :] + 0.5) % 1.0 - 0.5) + np.eye(len(centres))
    assert gaps.min() > 0.1


def test_sprite_decoder_reads_labels_not_render_details() -> None:
    # the measurements do not depend on the renderer's own code paths: a sprite shifted by whole
    # pixels moves its centroid by exactly that much and keeps its area and hue
    sizes = {"shape": 4, "scale": 4, "rotation": 8, "x": 8, "y": 8, "hue": 8}
    factors = np.array([[2, 3, 5, 1, 2, 3], [2, 3, 5, 2, 2, 3]])
    first, second = (measure_sprites(render_sprites(factors[i : i + 1], sizes)) for i in range(2))
    shift = np.diff(factor_values(sizes, 64)["x"][1:3])[0]
    assert second["x"][0] - first["x"][0] == pytest.approx(shift)
    assert second["area"][0] == pytest.approx(first["area"][0]) and second["hue"][0] == first["hue"][0]


def test_sprites_factors_are_independent_and_decodable(tmp_path: Path) -> None:
    cfg = dataset_config(PARAMS, "sprites")
    out = _roundtrip("sprites", cfg, tmp_path)
    meta = LMDBImageDataset(out / "train").meta
    assert meta.label_names == ("shape", "scale", "rotation", "x", "y", "hue")
    assert list(meta.label_sizes) == list(cfg["factors"].values())
    images, factors = _read_all(out / "train")
    assert len(np.unique(factors, axis=0)) == len(factors) == round(cfg["count"] * (1 - cfg["val_fraction"]))

    # independent: every pair of factors has (almost) zero empirical mutual information,
    # and every factor covers all its values about uniformly
    for a in range(6):
        counts = np.bincount(factors[:, a], minlength=meta.label_sizes[a])
        assert counts.min() > 0.7 * len(factors) / meta.label_sizes[a]
        for b in range(a + 1, 6):
            assert mutual_info_score(factors[:, a], factors[:, b]) < 0.02

    # decodable: position, scale and hue measured from the pixels alone recover the labels
    assert_sprite_pixels_match_labels(images, factors, cfg["factors"])
    # and each factor changes the image
    base = np.zeros((1, 6), dtype=np.int64)
    for k in range(6):
        other = base.copy()
        other[0, k] = 1
        assert not np.array_equal(render_sprites(base, cfg["factors"]), render_sprites(other, cfg["factors"]))


def test_sprites_full_product_and_stale_raw_data(tmp_path: Path) -> None:
    cfg = {
        "image_size": 64,
        "channels": 3,
        "factors": {"shape": 2, "scale": 2, "rotation": 2, "x": 2, "y": 2, "hue": 3},
        "count": None,
        "val_fraction": 0.25,
    }
    out = _roundtrip("sprites", cfg, tmp_path)
    total = math.prod(cfg["factors"].values())
    counts = [inspect_dataset("sprites", tmp_path)["splits"][s]["count"] for s in ("train", "val")]
    assert counts == [total - total // 4, total // 4]
    assert (out / "train").is_dir()
    with pytest.raises(
        DatasetError, match=r"datasets.sprites.seed changed\): rebuild it with `dvc repro download@sprites`"
    ):
        convert_dataset("sprites", {**cfg, "seed": 1}, tmp_path / "raw", tmp_path / "lmdb")
