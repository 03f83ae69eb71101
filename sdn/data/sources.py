"""One source per dataset: how it reaches `data/raw/<name>/` and how conversion reads it back.

`download_dataset` and `convert_dataset` are what the `download` and `convert` stages run.
Remote sources download one verified file (see `sdn.data.download`); the offline sources
(photos32, sprites) build their arrays from installed packages and write them as `.npy` files
(byte-identical on every run, unlike `.npz` archives, which stamp the time).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lmdb
import numpy as np

from sdn.atomic import replace_dir, temp_dir
from sdn.data import photos, sprites
from sdn.data.download import ALGORITHMS, fetch, file_name, verify_file
from sdn.data.lmdb_store import SplitMetadata, write_split
from sdn.data.tfrecord import parse_example, read_records
from sdn.errors import ConfigError, DatasetError, DatasetNotFoundError, did_you_mean, local_write_error
from sdn.schema import AT_LEAST_1, SEED, UNIT_OPEN, Range, check_value, missing_key, reject_unknown, type_ok

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (images (B, C, H, W) uint8, labels (B, K) int64)
_REQUIRED = object()
_READ_CHUNK = 4096


@dataclass(frozen=True)
class SplitSource:
    """One split as conversion reads it: batches made on demand, and their count if known."""

    batches: Callable[[], Batches]
    count: int | None = None


@dataclass(frozen=True)
class DatasetContent:
    """A dataset's splits and label description, read from its raw files."""

    splits: dict[str, SplitSource]
    label_names: tuple[str, ...] = ()
    label_sizes: tuple[int, ...] = ()
    label_values: dict[str, list[Any]] = field(default_factory=dict)


class Source:
    """Base of the dataset sources: validated settings (`datasets.<name>` in params.yaml)."""

    # key -> (its type, as `sdn.config.type_ok` reads it; default or _REQUIRED)
    schema: ClassVar[dict[str, tuple[Any, Any]]] = {
        "image_size": (int, _REQUIRED),
        "channels": (int, _REQUIRED),
        "flip": (bool, False),
    }
    # The range of every numeric setting (tests/test_config.py fails for one without a range).
    ranges: ClassVar[dict[str, Range]] = {"image_size": AT_LEAST_1, "channels": Range(3, 3)}

    def __init__(self, name: str, cfg: Mapping[str, Any] | None) -> None:
        self.name = name
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"datasets.{name}: expected a mapping of settings, got {type(cfg).__name__}.")
        self.given = set(cfg)
        where = f"datasets.{name}"
        reject_unknown(cfg, list(self.schema), where, "unknown setting for this dataset")
        self.cfg: dict[str, Any] = {}
        for key, (hint, default) in self.schema.items():
            if key in cfg:
                check_value(cfg[key], hint, f"{where}.{key}")
                self.cfg[key] = cfg[key]
            elif default is _REQUIRED:
                raise missing_key(f"{where}.{key}", hint)
            else:
                self.cfg[key] = default
            if key in self.ranges:
                self.ranges[key].check(self.cfg[key], f"{where}.{key}")
        self.check()

    def _require(self, ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"datasets.{self.name}.{key}: {why} (got {self.cfg.get(key)!r}).")

    def check(self) -> None:
        """Checks that involve more than one key's type."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cfg["channels"], self.cfg["image_size"], self.cfg["image_size"])

    def provenance(self) -> dict[str, Any]:
        """What the converted data was made from, recorded in its metadata."""
        return dict(self.cfg)

    def download(self, raw_dir: Path) -> None:
        raise NotImplementedError

    def read(self, raw_dir: Path) -> DatasetContent:
        raise NotImplementedError

    def _missing_raw(self, path: Path) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"{path} not found: fetch the raw data with `dvc repro download@{self.name}` "
            f"(or `python stages/download.py {self.name}`)."
        )


class RemoteSource(Source):
    """A dataset downloaded as one file whose checksum is pinned in params.yaml."""

    schema = {
        **Source.schema,
        "url": (str, _REQUIRED),
        "md5": (str | None, None),
        "sha256": (str | None, None),
    }

    def check(self) -> None:
        pinned = [key for key in ALGORITHMS if key in self.given]
        if len(pinned) != 1:
            raise ConfigError(
                f"datasets.{self.name}: give exactly one of md5 or sha256 for the downloaded file "
                f"(found {len(pinned)}); write `sha256: null` if no checksum is known yet."
            )
        self.algorithm = pinned[0]
        digest = self.cfg[self.algorithm]
        width = {"md5": 32, "sha256": 64}[self.algorithm]
        self._require(
            digest is None or re.fullmatch(f"[0-9a-fA-F]{{{width}}}", digest) is not None,
            self.algorithm,
            f"must be {width} hex digits",
        )
        file_name(self.cfg["url"])

    def archive(self, raw_dir: Path) -> Path:
        """The raw file, once its checksum matches the pinned one: it is checked here, at
        conversion, and not only at download, since a file can be put or changed by hand."""
        path = raw_dir / file_name(self.cfg["url"])
        if not path.is_file():
            raise self._missing_raw(path)
        self.verified_digest = verify_file(
            path,
            self.algorithm,
            self.cfg[self.algorithm],
            rerun=f"dvc repro convert@{self.name}",
            pin_key=f"datasets.{self.name}.{self.algorithm}",
        )
        return path

    def provenance(self) -> dict[str, Any]:
        # the digest computed from the file that was read, not the pinned value it was checked against
        return {"url": self.cfg["url"], self.algorithm: getattr(self, "verified_digest", None)}

    def download(self, raw_dir: Path) -> None:
        fetch(
            self.cfg["url"],
            raw_dir / file_name(self.cfg["url"]),
            self.algorithm,
            self.cfg[self.algorithm],
            rerun=f"make {self.name}",
            pin_key=f"datasets.{self.name}.{self.algorithm}",
        )


class Cifar10Source(RemoteSource):
    """CIFAR-10, python version: pickled batches of (N, 3072) uint8 rows in R, G, B planes."""

    def read(self, raw_dir: Path) -> DatasetContent:
        archive = self.archive(raw_dir)
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m.name for m in tar.getmembers() if m.isfile()}
            train = sorted(
                (n for n in members if re.fullmatch(r"data_batch_\d+", n)),
                key=lambda n: int(n.rsplit("_", 1)[1]),
            )
            missing = [n for n in ("batches.meta", "test_batch") if n not in members] + (
                [] if train else ["data_batch_*"]
            )
            if missing:
                raise DatasetError(
                    f"{archive} is not CIFAR-10's python archive: it lacks {', '.join(missing)}."
                )
            classes = [c.decode() for c in self._unpickle(tar, members["batches.meta"])[b"label_names"]]

        def batches(names: list[str]) -> Batches:
            with tarfile.open(archive) as tar:
                for batch_name in names:
                    batch = self._unpickle(tar, members[batch_name])
                    data = np.asarray(batch[b"data"], dtype=np.uint8)
                    if data.ndim != 2 or data.shape[1] != math.prod(self.shape):
                        raise DatasetError(
                            f"{archive}:{batch_name} holds rows of {data.shape[1:]} bytes, "
                            f"not {self.shape} images (datasets.{self.name}.image_size)."
                        )
                    labels = np.asarray(batch[b"labels"], dtype=np.int64)[:, None]
                    yield data.reshape(-1, *self.shape), labels

        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(train)),
                "val": SplitSource(lambda: batches(["test_batch"])),
            },
            label_names=("class",),
            label_sizes=(len(classes),),
            label_values={"class": classes},
        )

    @staticmethod
    def _unpickle(tar: tarfile.TarFile, member: str) -> dict:
        # The archive's checksum has been checked, and still nothing in it may run: see _BatchUnpickler.
        where = f"{tar.name}:{member}"
        with tar.extractfile(member) as handle:
            try:
                batch = _BatchUnpickler(handle, where).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
                raise DatasetError(f"{where} is not a readable CIFAR-10 batch ({error}).") from error
        if not isinstance(batch, dict) or not all(isinstance(k, bytes) for k in batch):
            raise DatasetError(f"{where} is not a CIFAR-10 batch (a dict with bytes keys).")
        data = batch.get(b"data")
        if data is not None and (not isinstance(data, np.ndarray) or data.dtype != np.uint8):
            raise DatasetError(f"{where}: 'data' is not a uint8 array.")
        return batch


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's python batches hold and nothing else.

    The batches are Python 2 pickles of dicts of byte strings, lists of ints and byte strings,
    and one uint8 numpy array; the only globals they name are the three that rebuild that array.
    Any other global (`os.system`, `builtins.eval`, ...) is how a pickle runs code: refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, handle, where: str) -> None:
        super().__init__(handle, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise DatasetError(
                f"{self.where} refers to {module}.{name}, which CIFAR-10's batches never hold: the "
                "archive is not the published one; it is not unpickled (nothing in it was run)."
            )
        return found


class GlowSource(RemoteSource):
    """GLOW's TFRecord tars (imagenet-oord, celeba): records of 'shape', 'data' (HWC bytes), 'label'.

    Shards are named `<split>/<split>-r<log2 resolution>-s-<index>-of-<total>.tfrecords`; the
    tar may hold several resolutions (ImageNet: 32 and 64) and prefixes (`mnt/host/...`).
    """

    _SHARD = re.compile(r"(?:^|/)(train|validation)/\1-r(\d+)-s-(\d+)-of-(\d+)\.tfrecords$")
    _SPLITS = {"train": "train", "val": "validation"}

    def check(self) -> None:
        super().check()
        size = self.cfg["image_size"]
        self._require(size & (size - 1) == 0, "image_size", "GLOW stores powers of two only")

    def read(self, raw_dir: Path) -> DatasetContent:
        archive = self.archive(raw_dir)
        level = self.cfg["image_size"].bit_length() - 1
        shards: dict[str, list[tuple[int, str]]] = {split: [] for split in self._SPLITS.values()}
        totals: dict[str, set[int]] = {split: set() for split in self._SPLITS.values()}
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                match = self._SHARD.search(member.name)
                if match and member.isfile() and int(match.group(2)) == level:
                    shards[match.group(1)].append((int(match.group(3)), member.name))
                    totals[match.group(1)].add(int(match.group(4)))
        for split, found in shards.items():
            expected = totals[split].pop() if len(totals[split]) == 1 else None
            if expected is None or sorted(i for i, _ in found) != list(range(expected)):
                raise DatasetError(
                    f"{archive} does not hold the complete {split} split at resolution {2**level} "
                    f"(r{level:02d}): found {len(found)} shard(s) of {sorted(totals[split]) or '?'}. "
                    "The archive is incomplete or not GLOW's: delete it and rerun "
                    f"`python stages/download.py {self.name}`."
                )

        def batches(split: str) -> Batches:
            with tarfile.open(archive) as tar:
                for _, member in sorted(shards[split]):
                    with tar.extractfile(member) as handle:
                        records = read_records(handle.read(), f"{archive}:{member}")
                    yield self._images(records, f"{archive}:{member}"), np.zeros((len(records), 0), np.int64)

        return DatasetContent(
            splits={ours: SplitSource(lambda s=theirs: batches(s)) for ours, theirs in self._SPLITS.items()}
        )

    def _images(self, records: list[bytes], where: str) -> np.ndarray:
        channels, height, width = self.shape
        images = np.empty((len(records), height, width, channels), dtype=np.uint8)
        for i, record in enumerate(records):
            features = parse_example(record)
            shape, data = features.get("shape"), features.get("data")
            if shape != [height, width, channels] or not data or len(data[0]) != images[i].size:
                raise DatasetError(
                    f"{where}: record {i} has shape {shape}, expected {[height, width, channels]} "
                    f"(datasets.{self.name}.image_size / channels)."
                )
            images[i] = np.frombuffer(data[0], dtype=np.uint8).reshape(height, width, channels)
        return images.transpose(0, 3, 1, 2)


def _val_mask(count: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random choice of round(count × fraction) items, as a boolean mask."""
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[: round(count * fraction)]] = True
    return mask


# Settings of a validation split drawn at random (3dshapes, sprites).
_HELD_OUT = {"val_fraction": (float, 0.1), "seed": (int, 0)}
_HELD_OUT_RANGES = {"val_fraction": UNIT_OPEN, "seed": SEED}


class Shapes3DSource(RemoteSource):
    """DeepMind's 3dshapes.h5: 'images' (N, 64, 64, 3) uint8 and 'labels' (N, 6) factor values."""

    FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    schema = {**RemoteSource.schema, **_HELD_OUT, "train_includes_val": (bool, True)}
    ranges = {**RemoteSource.ranges, **_HELD_OUT_RANGES}

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
        val = _val_mask(len(codes), float(self.cfg["val_fraction"]), self.cfg["seed"])
        train = np.ones_like(val) if self.cfg["train_includes_val"] else ~val

        def batches(mask: np.ndarray) -> Batches:
            with h5py.File(path, "r") as handle:
                images = handle["images"]
                for start in range(0, len(mask), _READ_CHUNK):
                    chosen = mask[start : start + _READ_CHUNK]
                    if chosen.any():
                        chunk = images[start : start + _READ_CHUNK][chosen]
                        yield chunk.transpose(0, 3, 1, 2), codes[start : start + _READ_CHUNK][chosen]

        return DatasetContent(
            splits={
                "train": SplitSource(lambda: batches(train), int(train.sum())),
                "val": SplitSource(lambda: batches(val), int(val.sum())),
            },
            label_names=self.FACTORS,
            label_sizes=tuple(len(v) for v in levels),
            label_values={n: np.round(v, 6).tolist() for n, v in zip(self.FACTORS, levels, strict=True)},
        )


def _write_arrays(raw_dir: Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write `<name>.npy` files and `info.json` into `raw_dir`, replacing it atomically."""
    tmp = temp_dir(raw_dir)
    try:
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array, allow_pickle=False)
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, raw_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _OfflineSource(Source):
    """A dataset built from installed packages; its raw folder records the settings it used."""

    generator_keys: ClassVar[tuple[str, ...]]  # the settings that change the raw arrays

    def _load(self, raw_dir: Path, *keys: str) -> tuple[dict[str, Any], list[np.ndarray]]:
        info_path = raw_dir / "info.json"
        if not info_path.is_file():
            raise self._missing_raw(info_path)
        info = json.loads(info_path.read_text())
        stale = ", ".join(
            f"datasets.{self.name}.{k}" for k in self.generator_keys if info.get(k) != self.cfg[k]
        )
        if stale:
            raise DatasetError(
                f"{raw_dir} was built with other settings ({stale} changed): rebuild it with "
                f"`dvc repro download@{self.name}` (or `python stages/download.py {self.name}`)."
            )
        return info, [np.load(raw_dir / f"{key}.npy", allow_pickle=False) for key in keys]


class Photos32Source(_OfflineSource):
    """photos32: patches of bundled photographs; validation photographs given by name."""

    schema = {
        **Source.schema,
        "photos": (list, _REQUIRED),
        "val_photos": (list, _REQUIRED),
        "stride": (int, _REQUIRED),
        "reductions": (list, [1]),
    }
    ranges = {**Source.ranges, "stride": AT_LEAST_1, "reductions": AT_LEAST_1}
    generator_keys = ("photos", "image_size", "stride", "reductions")

    def check(self) -> None:
        known = set(photos.PHOTOS)
        for key in ("photos", "val_photos"):
            unknown = [p for p in self.cfg[key] if p not in known]
            self._require(
                not unknown, key, f"unknown photo(s) {unknown}; bundled: {', '.join(photos.PHOTOS)}"
            )
        self._require(
            len(set(self.cfg["photos"])) == len(self.cfg["photos"]), "photos", "lists a photo twice"
        )
        val_photos = set(self.cfg["val_photos"])
        self._require(
            bool(val_photos) and val_photos < set(self.cfg["photos"]),
            "val_photos",
            "must be some, but not all, of `photos`",
        )
        self._require(
            bool(self.cfg["reductions"]) and all(type_ok(r, int) for r in self.cfg["reductions"]),
            "reductions",
            "must be a list of integer factors >= 1",
        )

    def download(self, raw_dir: Path) -> None:
        patches, origins = photos.cut_patches(
            self.cfg["photos"], self.cfg["image_size"], self.cfg["stride"], self.cfg["reductions"]
        )
        info = {k: self.cfg[k] for k in self.generator_keys}
        info["origin_columns"] = ["photo", "reduction", "y", "x"]
        _write_arrays(raw_dir, {"patches": patches, "origins": origins}, info)

    def read(self, raw_dir: Path) -> DatasetContent:
        _, (patches, origins) = self._load(raw_dir, "patches", "origins")
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


class SpritesSource(_OfflineSource):
    """sprites: rendered images of factors drawn uniformly from their product (see `sdn.data.sprites`)."""

    schema = {
        **Source.schema,
        **_HELD_OUT,
        "count": (int | None, None),
        "factors": (dict, _REQUIRED),
    }
    # factors: the number of values of each factor
    ranges = {**Source.ranges, **_HELD_OUT_RANGES, "count": Range(2), "factors": AT_LEAST_1}
    generator_keys = ("image_size", "factors", "count", "seed")

    def check(self) -> None:
        for factor, size in self.cfg["factors"].items():
            self.ranges["factors"].check(size, f"datasets.{self.name}.factors.{factor}")
        problem = sprites.check_sizes(self.cfg["factors"], self.cfg["image_size"])
        self._require(problem is None, "factors", problem or "")
        # labels come in the renderer's order, whatever the order in params.yaml
        self.cfg["factors"] = {name: self.cfg["factors"][name] for name in sprites.FACTOR_NAMES}
        total = math.prod(self.cfg["factors"].values())
        count = self.cfg["count"]
        self._require(
            count is None or 2 <= count <= total,
            "count",
            f"must be null (all {total} combinations) or 2..{total}",
        )

    def download(self, raw_dir: Path) -> None:
        sizes = self.cfg["factors"]
        factors = sprites.sample_factors(list(sizes.values()), self.cfg["count"], self.cfg["seed"])
        images = sprites.render_sprites(factors, sizes, self.cfg["image_size"])
        info = {k: self.cfg[k] for k in self.generator_keys}
        info["values"] = sprites.factor_values(sizes, self.cfg["image_size"])
        _write_arrays(raw_dir, {"images": images, "factors": factors}, info)

    def read(self, raw_dir: Path) -> DatasetContent:
        info, (images, factors) = self._load(raw_dir, "images", "factors")
        val = _val_mask(len(images), float(self.cfg["val_fraction"]), self.cfg["seed"])

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


SOURCES: dict[str, type[Source]] = {
    "photos32": Photos32Source,
    "sprites": SpritesSource,
    "cifar10": Cifar10Source,
    "imagenet32": GlowSource,
    "celebahq256": GlowSource,
    "3dshapes": Shapes3DSource,
}


def validate_datasets(params: Mapping[str, Any]) -> None:
    """Check every `datasets.<name>` section of params.yaml (its keys, types and ranges)."""
    datasets = params.get("datasets") or {}
    if not isinstance(datasets, Mapping):
        raise ConfigError("datasets: expected a mapping of dataset name to settings.")
    for name, settings in datasets.items():
        make_source(name, settings)


def make_source(name: str, cfg: Mapping[str, Any] | None) -> Source:
    """The validated source of dataset `name` (its `datasets.<name>` settings)."""
    if name not in SOURCES:
        hint = did_you_mean(name, SOURCES)
        raise ConfigError(f"datasets.{name}: no data source is implemented for it.{hint}")
    return SOURCES[name](name, cfg)


def download_dataset(
    name: str, cfg: Mapping[str, Any] | None, raw_root: Path | str = Path("data/raw")
) -> Path:
    """Fetch (remote) or build (offline) the raw files of `name` into `raw_root/<name>/`."""
    source = make_source(name, cfg)
    raw_dir = Path(raw_root) / name
    try:
        source.download(raw_dir)
    except OSError as error:
        named = local_write_error(error, raw_dir, f"dvc repro download@{name}")
        if named is None:
            raise
        raise named from error
    return raw_dir


def convert_dataset(
    name: str,
    cfg: Mapping[str, Any] | None,
    raw_root: Path | str = Path("data/raw"),
    lmdb_root: Path | str = Path("data/lmdb"),
    *,
    map_size: int | None = None,
) -> Path:
    """Convert `raw_root/<name>/` into one LMDB environment per split under `lmdb_root/<name>/`.

    Everything is written into a hidden temporary folder that replaces `lmdb_root/<name>`
    only when all splits are complete: an interrupted conversion leaves no output.
    """
    source = make_source(name, cfg)
    content = source.read(Path(raw_root) / name)
    lmdb_root = Path(lmdb_root)
    try:
        lmdb_root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(lmdb_root / name)
    except OSError as error:
        named = local_write_error(error, lmdb_root, f"dvc repro convert@{name}")
        if named is None:
            raise
        raise named from error
    writing = tmp
    try:
        for split, split_source in content.splits.items():
            writing = tmp / split
            meta = SplitMetadata(
                dataset=name,
                split=split,
                count=0,
                shape=source.shape,
                label_names=content.label_names,
                label_sizes=content.label_sizes,
                label_values=content.label_values,
                source=source.provenance(),
            )
            written = write_split(
                tmp / split, split_source.batches(), meta, total=split_source.count, map_size=map_size
            )
            if written.count == 0:
                raise DatasetError(
                    f"{name}: the {split} split is empty; check datasets.{name} in params.yaml."
                )
        final = lmdb_root / name
        writing = final
        replace_dir(tmp, final)
    except BaseException as error:
        named = None
        if isinstance(error, (OSError, lmdb.Error)):  # LMDB reports a failed write without its errno
            shown = lmdb_root / name / writing.relative_to(tmp) if writing.is_relative_to(tmp) else writing
            named = local_write_error(error, writing, f"dvc repro convert@{name}", shown)
        shutil.rmtree(tmp, ignore_errors=True)
        if named is not None:
            raise named from error
        raise
    return final
