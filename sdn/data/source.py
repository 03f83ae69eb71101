"""What every dataset source shares: its settings (`datasets.<name>` in params.yaml, a dataclass
checked by `sdn.schema`), the content conversion reads back, and the two ways raw files arrive.

A `RemoteSource` downloads one file whose checksum is pinned (see `sdn.data.download`); an
`OfflineSource` builds its arrays from installed packages and writes them as `.npy` files
(byte-identical on every run, unlike `.npz` archives, which stamp the time). Each dataset's own
format lives in its own module (`sdn.data.cifar`, `glow`, `shapes3d`, `photos`, `sprites`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdn.atomic import replace_dir, temp_dir
from sdn.data.download import ALGORITHMS, fetch, file_name, verify_file
from sdn.errors import ConfigError, DatasetError, DatasetNotFoundError
from sdn.schema import AT_LEAST_1, SEED, UNIT_OPEN, Range, build_section, ranged

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (images (B, C, H, W) uint8, labels (B, K) int64)


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


@dataclass(kw_only=True)
class DatasetSettings:
    """The settings of every dataset; each source's own extend them (their order: the order of
    the checks and of the provenance recorded in the converted data)."""

    image_size: int = ranged(allowed=AT_LEAST_1)
    channels: int = ranged(allowed=Range(3, 3))
    flip: bool = False


@dataclass(kw_only=True)
class RemoteSettings(DatasetSettings):
    """A downloaded file: its URL and exactly one pinned checksum (null until first downloaded)."""

    url: str
    md5: str | None = None
    sha256: str | None = None


def val_fraction() -> Any:
    """The field of a validation split drawn at random (3dshapes, sprites): its share of the images."""
    return ranged(0.1, UNIT_OPEN)


def val_seed() -> Any:
    """The field of the seed that draws a random validation split."""
    return ranged(0, SEED)


def val_mask(count: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random choice of round(count × fraction) items, as a boolean mask."""
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[: round(count * fraction)]] = True
    return mask


class Source:
    """Base of the dataset sources: validated settings (`datasets.<name>` in params.yaml)."""

    settings: ClassVar[type[DatasetSettings]] = DatasetSettings

    def __init__(self, name: str, cfg: Mapping[str, Any] | None) -> None:
        self.name = name
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"datasets.{name}: expected a mapping of settings, got {type(cfg).__name__}.")
        self.given = set(cfg)
        values = build_section(
            self.settings, dict(cfg), f"datasets.{name}", unknown="unknown setting for this dataset"
        )
        settings = self.settings(**values)
        self.cfg: dict[str, Any] = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        self.check()

    def require(self, ok: bool, key: str, why: str) -> None:
        """Raise a ConfigError naming `datasets.<name>.<key>` and its value unless `ok`."""
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

    def missing_raw(self, path: Path) -> DatasetNotFoundError:
        """The error for a raw file not there: the command that fetches or builds it."""
        return DatasetNotFoundError(
            f"{path} not found: fetch the raw data with `dvc repro download@{self.name}` "
            f"(or `python stages/download.py {self.name}`)."
        )


class RemoteSource(Source):
    """A dataset downloaded as one file whose checksum is pinned in params.yaml."""

    settings = RemoteSettings

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
        self.require(
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
            raise self.missing_raw(path)
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


class OfflineSource(Source):
    """A dataset built from installed packages; its raw folder records the settings it used."""

    generator_keys: ClassVar[tuple[str, ...]]  # the settings that change the raw arrays

    def write_arrays(self, raw_dir: Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
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

    def load_arrays(self, raw_dir: Path, *keys: str) -> tuple[dict[str, Any], list[np.ndarray]]:
        """`info.json` and the arrays `keys` of `raw_dir`, refused if built with other settings."""
        info_path = raw_dir / "info.json"
        if not info_path.is_file():
            raise self.missing_raw(info_path)
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
