"""Data: verified downloads, LMDB conversion and loaders for every dataset of the pipeline.

Flow: `sdn.data.sources.download_dataset` fills `data/raw/<name>/`, `convert_dataset` writes one
LMDB environment per split to `data/lmdb/<name>/`, and `sdn.data.datamodule.ImageDataModule` /
`sdn.data.lmdb_store.LMDBImageDataset` serve it as uint8 (C, H, W) images with int64 labels: the
one way training, evaluation and sampling read their data. Each name is imported from the module
that defines it, so a stage's imports (and its DVC deps) are the modules it uses.
"""
