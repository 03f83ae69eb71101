"""The dataset of each name, and what the `download` and `convert` stages run on it.

`download_dataset` fills `data/raw/<name>/` (a verified download, or arrays built offline);
`convert_dataset` reads it back through the dataset's source and writes one LMDB environment per
split to `data/lmdb/<name>/`. Each source, with its settings and its raw format, is in its own
module.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmdb

from sdn.atomic import replace_dir, temp_dir
from sdn.data.cifar import Cifar10Source
from sdn.data.glow import GlowSource
from sdn.data.lmdb_store import SplitMetadata, write_split
from sdn.data.photos import Photos32Source
from sdn.data.shapes3d import Shapes3DSource
from sdn.data.source import Source
from sdn.data.sprites import SpritesSource
from sdn.errors import ConfigError, DatasetError, did_you_mean, local_write_error

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
