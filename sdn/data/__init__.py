"""Data: verified downloads, LMDB conversion and loaders for every dataset of the pipeline.

Flow: `download_dataset` fills `data/raw/<name>/`, `convert_dataset` writes one LMDB
environment per split to `data/lmdb/<name>/`, and `ImageDataModule` / `LMDBImageDataset`
serve it as uint8 (C, H, W) images with int64 labels: the one way training, evaluation and
sampling read their data.
"""

from typing import Any

from sdn.data.lmdb_store import LMDBImageDataset, SplitMetadata, inspect_dataset, open_split, read_metadata

__all__ = [
    "SOURCES",
    "ImageDataModule",
    "LMDBImageDataset",
    "SplitMetadata",
    "convert_dataset",
    "download_dataset",
    "inspect_dataset",
    "make_source",
    "open_split",
    "read_metadata",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use. The DataModule needs pytorch_lightning, slow to import; the sources
    # import every dataset's downloader and reader, which training does not need (nor should it
    # re-run when they change: dvc.yaml lists each stage's modules).
    if name == "ImageDataModule":
        from sdn.data import datamodule

        return getattr(datamodule, name)
    if name in ("SOURCES", "convert_dataset", "download_dataset", "make_source"):
        from sdn.data import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'sdn.data' has no attribute {name!r}")
