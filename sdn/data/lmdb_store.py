"""LMDB storage of image datasets: one environment per split, described by metadata inside it.

Each split of `data/lmdb/<dataset>/` is an LMDB environment (`train/`, `val/`) holding

* `__meta__`: JSON metadata (`SplitMetadata`): count, image shape, dtype, encoding, label
  names, sizes and value names, and where the data came from. It is written last, in the
  final transaction, so an environment without it is incomplete.
* `0000000000`, `0000000001`, ...: image `i` as raw uint8 bytes in (C, H, W) order, followed
  by its labels as little-endian int64 and the CRC-32C of both (little-endian uint32).

Every reader goes through `read_metadata` (and `LMDBImageDataset`, built on it), which checks
before any record is touched that the file is not truncated (LMDB maps the file: a read past
its end is a SIGBUS, not an exception), that the metadata matches the database and, where the
caller says what it expects, the dataset, split and image shape. Each record's CRC-32C is checked
as it is read, so a flipped bit on disk is an error naming the record, never different pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import google_crc32c
import lmdb
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from sdn.errors import DatasetError, DatasetNotFoundError

META_KEY = b"__meta__"
FORMAT = "sdn-lmdb-images"
VERSION = 2
ENCODING = (
    "uint8 image bytes in (C, H, W) order, then int64 little-endian labels, then the CRC-32C "
    "(Castagnoli) of both as a little-endian uint32"
)
CRC_BYTES = 4
# LMDB's two meta pages: a smaller file cannot even be opened without reading past its end.
_MIN_FILE_BYTES = 2 * 4096
_MIN_MAP_SIZE = 1 << 26


def record_key(index: int) -> bytes:
    """Fixed-width decimal keys keep LMDB's B-tree in index order (appends are cheap)."""
    return b"%010d" % index


def convert_hint(split_path: Path, dataset: str | None = None) -> str:
    """The command that rebuilds a split at `data/lmdb/<dataset>/<split>`."""
    dataset = dataset or Path(split_path).parent.name
    return f"`dvc repro convert@{dataset}` (or `python stages/convert.py {dataset}`)"


@dataclass(frozen=True)
class SplitMetadata:
    """What one split holds; stored as JSON under `__meta__` in its environment."""

    dataset: str
    split: str
    count: int
    shape: tuple[int, int, int]
    label_names: tuple[str, ...] = ()
    label_sizes: tuple[int, ...] = ()
    label_values: dict[str, list[Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def image_bytes(self) -> int:
        channels, height, width = self.shape
        return channels * height * width

    @property
    def payload_bytes(self) -> int:
        """Image and labels: what the record's CRC covers."""
        return self.image_bytes + 8 * len(self.label_names)

    @property
    def record_bytes(self) -> int:
        return self.payload_bytes + CRC_BYTES

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready form stored in the database (with format, dtype and encoding)."""
        data = asdict(self)
        data.update(
            shape=list(self.shape), label_names=list(self.label_names), label_sizes=list(self.label_sizes)
        )
        return {
            "format": FORMAT,
            "version": VERSION,
            "dtype": "uint8",
            "label_dtype": "int64",
            "encoding": ENCODING,
            "record_checksum": "crc32c",
            **data,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> SplitMetadata:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise DatasetError(
                f"{where} was not written by this version of sdn (format {data.get('format')!r}, "
                f"version {data.get('version')!r}): rebuild it with {convert_hint(Path(where))}."
            )
        try:
            return cls(
                dataset=data["dataset"],
                split=data["split"],
                count=int(data["count"]),
                shape=tuple(int(d) for d in data["shape"]),
                label_names=tuple(data["label_names"]),
                label_sizes=tuple(data["label_sizes"]),
                label_values=data.get("label_values", {}),
                source=data.get("source", {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(
                f"{where}: malformed metadata ({error!r}); rebuild it with {convert_hint(Path(where))}."
            ) from error


# One read-only environment per database file and process, shared by every reader: LMDB
# refuses to open a file twice in one process, and one inherited through fork() must not be used.
_OPEN: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}


def _truncated(data_file: Path, size: int, needed: int) -> DatasetError:
    return DatasetError(
        f"{data_file} is truncated ({size} bytes, the database needs {needed}): delete "
        f"{data_file.parent.parent} and rebuild it with `dvc repro convert@{data_file.parent.parent.name}`."
    )


def open_environment(path: Path) -> lmdb.Environment:
    """The split's read-only LMDB environment, shared in this process and checked for truncation."""
    data_file = path / "data.mdb"
    try:
        stat = data_file.stat()
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"{path} is not a converted dataset split: build it with {convert_hint(path)}."
        ) from None
    key, pid, identity = os.path.realpath(path), os.getpid(), (stat.st_dev, stat.st_ino)
    cached = _OPEN.pop(key, None)
    if cached is not None:
        if cached[:2] == (pid, identity):
            _OPEN[key] = cached
            _check_size(data_file, cached[2])  # the file may have been cut since it was opened
            return cached[2]
        cached[2].close()  # inherited from the parent (its copy stays open there), or rebuilt since
    if stat.st_size < _MIN_FILE_BYTES:
        raise _truncated(data_file, stat.st_size, _MIN_FILE_BYTES)
    try:
        # lock=False: read-only users need no lock file (works on read-only mounts, many workers).
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise DatasetError(
            f"{path} is not a readable LMDB database ({error}): delete it and rebuild it with "
            f"{convert_hint(path)}."
        ) from error
    try:
        _check_size(data_file, env)
    except BaseException:
        env.close()
        raise
    _OPEN[key] = (pid, identity, env)
    return env


def _check_size(data_file: Path, env: lmdb.Environment) -> None:
    """LMDB maps its file into memory, so reading a page past the end of a truncated file kills
    the process with SIGBUS instead of raising: compare the file with the size LMDB recorded."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data_file.stat().st_size
    if size < needed:
        raise _truncated(data_file, size, needed)


def read_metadata(
    path: Path | str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> SplitMetadata:
    """The metadata of the split at `path`, after checking it matches the database.

    The one door to a converted split: the file is checked for truncation before LMDB reads a
    page, and `dataset`, `split` and `shape`, where given, must be what the metadata says (a
    dataset converted for another name, even with images of the same shape, is refused).
    """
    path = Path(path)
    hint = convert_hint(path, dataset)
    try:
        with open_environment(path).begin() as txn:
            raw = txn.get(META_KEY)
            entries = txn.stat()["entries"]
    except lmdb.Error as error:
        raise DatasetError(f"{path} is corrupt ({error}): rebuild it with {hint}.") from error
    if raw is None:
        raise DatasetError(f"{path} has no metadata: its conversion did not finish; rebuild it with {hint}.")
    try:
        meta = SplitMetadata.from_json(json.loads(raw), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable metadata ({error}); rebuild it with {hint}.") from error
    if entries != meta.count + 1:
        raise DatasetError(
            f"{path}: metadata promises {meta.count} images but the database holds {entries - 1}: "
            f"rebuild it with {hint}."
        )
    expected = {"dataset": dataset, "split": split, "shape": None if shape is None else tuple(shape)}
    for what, want in expected.items():
        found = getattr(meta, what)
        if want is not None and found != want:
            raise DatasetError(
                f"{path} holds {what} {found!r} but {want!r} is expected here: it was converted for "
                f"something else. Delete {path.parent} and rebuild it with {hint}."
            )
    return meta


def write_split(
    path: Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    meta: SplitMetadata,
    *,
    total: int | None = None,
    map_size: int | None = None,
) -> SplitMetadata:
    """Write one split from `(images (B, C, H, W) uint8, labels (B, K) int64)` batches.

    `meta.count` is ignored and replaced by the number of images written. The map grows (doubles)
    whenever it fills up. Returns the metadata as stored.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if map_size is None:
        map_size = max(_MIN_MAP_SIZE, int(1.2 * (total or 0) * (meta.record_bytes + 64)))
    # sync off while writing (one explicit sync at the end): the caller renames only complete data.
    # lock=False: no lock.mdb is left beside the data, so a reconversion is byte-identical
    env = lmdb.open(str(path), map_size=map_size, sync=False, lock=False)
    count = 0
    try:
        with tqdm(total=total, unit="img", desc=f"{meta.dataset}/{meta.split}", mininterval=1.0) as bar:
            for images, labels in batches:
                items = list(_records(images, labels, meta, count))
                _put_growing(env, items)
                count += len(items)
                bar.update(len(items))
        final = replace(meta, count=count)
        _put_growing(env, [(META_KEY, json.dumps(final.to_json()).encode())])
        env.sync(True)
    finally:
        env.close()
    return final


def _records(
    images: np.ndarray, labels: np.ndarray, meta: SplitMetadata, start: int
) -> Iterator[tuple[bytes, bytes]]:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype="<i8")
    if images.shape[1:] != meta.shape:
        raise DatasetError(
            f"{meta.dataset}/{meta.split}: image {start} has shape {images.shape[1:]}, "
            f"expected {meta.shape} (datasets.{meta.dataset}.image_size / channels)."
        )
    if labels.shape != (len(images), len(meta.label_names)):
        raise DatasetError(
            f"{meta.dataset}/{meta.split}: labels of shape {labels.shape} for {len(images)} images, "
            f"expected {len(meta.label_names)} per image ({', '.join(meta.label_names)})."
        )
    if (
        meta.label_sizes
        and len(labels)
        and ((labels < 0).any() or (labels >= np.array(meta.label_sizes)).any())
    ):
        raise DatasetError(
            f"{meta.dataset}/{meta.split}: a label lies outside 0..size-1 for sizes {meta.label_sizes}."
        )
    for i in range(len(images)):
        payload = images[i].tobytes() + labels[i].tobytes()
        # CRC-32C: computed by the CPU's CRC32 instruction, about 9x faster to check than zlib's CRC-32
        yield record_key(start + i), payload + google_crc32c.value(payload).to_bytes(CRC_BYTES, "little")


def _put_growing(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value, append=key != META_KEY)
            return
        except lmdb.MapFullError:
            # The aborted transaction left nothing behind: double the map and write the batch again.
            env.set_mapsize(env.info()["map_size"] * 2)


class LMDBImageDataset(Dataset):
    """One converted split, as `(image uint8 (C, H, W), labels int64 (K,))` pairs.

    Opening checks the split through `read_metadata` (with the `dataset`, `split` and `shape`
    the caller expects, where given); every record's CRC is checked as it is read. The
    environment is opened lazily, read-only, in each process that reads (fork-safe with
    DataLoader workers) and shared with the other readers of the same split in that process.
    `transform` is applied to the uint8 image.
    """

    def __init__(
        self,
        path: Path | str,
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        dataset: str | None = None,
        split: str | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.meta = read_metadata(self.path, dataset=dataset, split=split, shape=shape)
        self.transform = transform
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.meta.count

    def __getstate__(self) -> dict[str, Any]:
        # An open environment must not cross a process boundary (spawn): each process opens its own.
        return {**self.__dict__, "_env": None, "_pid": None}

    def _corrupt(self, index: int, what: str) -> DatasetError:
        meta = self.meta
        return DatasetError(
            f"{meta.dataset}/{meta.split} record {index} {what} ({self.path}): the database is corrupt "
            f"or does not match its metadata; rebuild it with {convert_hint(self.path, meta.dataset)}."
        )

    def record(self, index: int) -> bytes:
        """The checked bytes of record `index`: image, then labels (the CRC removed)."""
        if self._pid != os.getpid():
            self._env = open_environment(self.path)
            self._pid = os.getpid()
        try:
            with self._env.begin() as txn:
                value = txn.get(record_key(index))
        except lmdb.Error as error:  # e.g. CorruptedError: a damaged page of the tree
            raise self._corrupt(index, f"cannot be read ({type(error).__name__}: {error})") from error
        if value is None or len(value) != self.meta.record_bytes:
            found = "missing" if value is None else f"{len(value)} bytes, expected {self.meta.record_bytes}"
            raise self._corrupt(index, f"is {found}")
        payload, stored = value[: -CRC_BYTES], int.from_bytes(value[-CRC_BYTES:], "little")
        computed = google_crc32c.value(payload)
        if computed != stored:
            raise self._corrupt(index, f"fails its checksum (crc32c {computed:08x}, stored {stored:08x})")
        return payload

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.path}")
        payload = self.record(index)
        image = torch.frombuffer(bytearray(payload[: self.meta.image_bytes]), dtype=torch.uint8)
        image = image.view(self.meta.shape)
        labels = torch.from_numpy(
            np.frombuffer(payload, dtype="<i8", offset=self.meta.image_bytes).astype(np.int64)
        )
        if self.transform is not None:
            image = self.transform(image)
        return image, labels


def open_split(
    lmdb_dir: Path | str,
    split: str,
    dataset: str,
    *,
    shape: tuple[int, int, int] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> LMDBImageDataset:
    """Split `split` of `dataset`, converted under `lmdb_dir` (`data/lmdb/<dataset>`), fully
    checked: what the pipeline's stages, the DataModule and `inspect` read through."""
    path = Path(lmdb_dir) / split
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path} not found: convert the dataset first (dvc repro convert@{dataset})."
        )
    return LMDBImageDataset(path, transform, dataset=dataset, split=split, shape=shape)


def verify_split(data: LMDBImageDataset) -> int:
    """Read every record of a split, checking its CRC; returns the count."""
    for index in tqdm(range(len(data)), desc=f"verify {data.meta.dataset}/{data.meta.split}",
                      unit="img", mininterval=1.0, leave=False):
        data.record(index)
    return len(data)


def inspect_dataset(name: str, data_root: Path | str = "data", *, verify: bool = True) -> dict[str, Any]:
    """JSON-ready summary of `data_root/lmdb/<name>`: per split its count, image shape and labels.

    With `verify`, every record's checksum is checked first (one read of the whole dataset)."""
    root = Path(data_root) / "lmdb" / name
    splits = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    if not splits:
        raise DatasetNotFoundError(
            f"{root} holds no converted dataset: build it with `dvc repro convert@{name}` "
            f"(or `python stages/convert.py {name}`)."
        )
    summary: dict[str, Any] = {"dataset": name, "path": str(root), "splits": {}}
    for split in splits:
        data = open_split(root, split.name, name)
        if verify:
            verify_split(data)
        meta = data.meta
        summary["splits"][split.name] = {
            "count": meta.count,
            "shape": list(meta.shape),
            "dtype": "uint8",
            "label_names": list(meta.label_names),
            "label_sizes": list(meta.label_sizes),
        }
    return summary
