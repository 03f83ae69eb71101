"""LMDB storage, interrupted conversions, corrupt databases, the DataModule and the stage scripts."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import yaml

from sdn.data.datamodule import ImageDataModule
from sdn.data.lmdb_store import (
    META_KEY,
    LMDBImageDataset,
    SplitMetadata,
    inspect_dataset,
    read_metadata,
    record_key,
    write_split,
)
from sdn.data.sources import convert_dataset, download_dataset
from sdn.errors import DatasetError, DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
SPRITES = {
    "image_size": 64,
    "channels": 3,
    "count": 96,
    "val_fraction": 0.25,
    "seed": 0,
    "factors": {"shape": 4, "scale": 2, "rotation": 4, "x": 4, "y": 4, "hue": 4},
}


@pytest.fixture(scope="module")
def sprites_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small converted sprites dataset: <root>/lmdb/sprites/{train,val}."""
    root = tmp_path_factory.mktemp("data")
    download_dataset("sprites", SPRITES, root / "raw")
    convert_dataset("sprites", SPRITES, root / "raw", root / "lmdb")
    return root


def _meta(count: int = 0) -> SplitMetadata:
    return SplitMetadata(
        dataset="demo",
        split="train",
        count=count,
        shape=(3, 4, 4),
        label_names=("a", "b"),
        label_sizes=(5, 7),
    )


def _batches(n: int, batch: int = 10):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
    labels = np.stack([rng.integers(0, 5, n), rng.integers(0, 7, n)], axis=1)
    return images, labels, [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


# --- storage -------------------------------------------------------------------------------------


def test_write_and_read_back_with_a_growing_map(tmp_path: Path) -> None:
    images, labels, batches = _batches(2000, batch=500)
    meta = write_split(tmp_path / "train", batches, _meta(), map_size=1 << 16)  # far too small at first
    assert meta.count == 2000
    assert lmdb.open(str(tmp_path / "train"), readonly=True).info()["map_size"] > 1 << 16
    dataset = LMDBImageDataset(tmp_path / "train")
    assert len(dataset) == 2000 and read_metadata(tmp_path / "train") == meta
    image, label = dataset[1234]
    assert image.dtype == torch.uint8 and label.dtype == torch.int64
    np.testing.assert_array_equal(image.numpy(), images[1234])
    np.testing.assert_array_equal(label.numpy(), labels[1234])
    np.testing.assert_array_equal(dataset[-1][0].numpy(), images[-1])
    with pytest.raises(IndexError):
        dataset[2000]


def test_writer_refuses_bad_batches(tmp_path: Path) -> None:
    images, labels, _ = _batches(4)
    with pytest.raises(DatasetError, match=r"shape \(3, 4, 5\), expected \(3, 4, 4\)"):
        write_split(tmp_path / "a", [(np.zeros((1, 3, 4, 5), np.uint8), labels[:1])], _meta())
    with pytest.raises(DatasetError, match="outside 0..size-1"):
        write_split(tmp_path / "b", [(images, labels + 7)], _meta())


def _damaged(root: Path, case: str) -> Path:
    """A fresh 30-image split under root/demo/<case> (readers cache open environments)."""
    split = root / "demo" / case
    write_split(split, _batches(30)[2], _meta())
    if case == "data.mdb":
        (split / "data.mdb").write_bytes(os.urandom(8192))
        return split
    env = lmdb.open(str(split))
    with env.begin(write=True) as txn:
        if case == "missing":
            txn.delete(record_key(29))
        elif case == "short":
            txn.put(record_key(29), b"short")
        else:
            txn.delete(META_KEY)
    env.close()
    return split


def test_incomplete_corrupt_or_mismatched_databases_fail_clearly(tmp_path: Path) -> None:
    hint = r"rebuild it with `dvc repro convert@demo`"
    with pytest.raises(DatasetError, match=rf"promises 30 images but the database holds 29: {hint}"):
        LMDBImageDataset(_damaged(tmp_path, "missing"))
    with pytest.raises(DatasetError, match=rf"record 29 is 5 bytes, expected 68.*{hint}"):
        LMDBImageDataset(_damaged(tmp_path, "short"))[29]
    with pytest.raises(DatasetError, match=rf"no metadata: its conversion did not finish; {hint}"):
        read_metadata(_damaged(tmp_path, "meta"))
    with pytest.raises(DatasetError, match=r"is not a readable LMDB database .*delete it and rebuild it"):
        read_metadata(_damaged(tmp_path, "data.mdb"))
    with pytest.raises(DatasetNotFoundError, match=r"build it with `dvc repro convert@demo`"):
        read_metadata(tmp_path / "demo" / "val")


def test_readers_share_one_environment_and_survive_fork(tmp_path: Path) -> None:
    images, _, batches = _batches(40)
    write_split(tmp_path / "train", batches, _meta())
    first, second = LMDBImageDataset(tmp_path / "train"), LMDBImageDataset(tmp_path / "train")
    assert torch.equal(first[3][0], second[3][0])  # LMDB would refuse a second open of the file
    # the main process has the environment open when the workers fork
    loader = torch.utils.data.DataLoader(first, batch_size=8, num_workers=2)
    np.testing.assert_array_equal(torch.cat([x for x, _ in loader]).numpy(), images)


# --- interrupted conversions ---------------------------------------------------------------------


def test_conversion_failing_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    download_dataset("sprites", SPRITES, tmp_path / "raw")
    convert_dataset("sprites", SPRITES, tmp_path / "raw", tmp_path / "lmdb")
    before = read_metadata(tmp_path / "lmdb" / "sprites" / "val")
    import sdn.data.sources as sources

    def failing_write(path: Path, batches, meta: SplitMetadata, **kwargs):
        if meta.split == "val":
            raise RuntimeError("disk on fire")
        return write_split(path, batches, meta, **kwargs)

    monkeypatch.setattr(sources, "write_split", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_dataset("sprites", {**SPRITES, "val_fraction": 0.5}, tmp_path / "raw", tmp_path / "lmdb")
    assert sorted(p.name for p in (tmp_path / "lmdb").iterdir()) == ["sprites"]  # no temporary left
    assert read_metadata(tmp_path / "lmdb" / "sprites" / "val") == before  # the old output is intact


def test_conversion_killed_midway_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    download_dataset("sprites", SPRITES, tmp_path / "raw")
    marker = tmp_path / "train-written"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import sdn.data.sources as sources

        original = sources.write_split

        def write_then_hang(path, batches, meta, **kwargs):
            written = original(path, batches, meta, **kwargs)
            Path({str(marker)!r}).touch()
            time.sleep(60)
            return written

        sources.write_split = write_then_hang
        sources.convert_dataset("sprites", {SPRITES!r}, {str(tmp_path / "raw")!r}, {str(tmp_path / "lmdb")!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "conversion did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    leftovers = list((tmp_path / "lmdb").iterdir())
    assert [p.name.startswith(".sprites.") and p.name.endswith(".tmp") for p in leftovers] == [True]
    assert (leftovers[0] / "train" / "data.mdb").exists()  # half written, but hidden and temporary
    with pytest.raises(DatasetNotFoundError, match=r"dvc repro convert@sprites"):
        inspect_dataset("sprites", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"dvc repro convert@sprites"):
        ImageDataModule(tmp_path / "lmdb" / "sprites", batch_size=4)

    convert_dataset("sprites", SPRITES, tmp_path / "raw", tmp_path / "lmdb")  # a rerun cleans up
    assert [p.name for p in (tmp_path / "lmdb").iterdir()] == ["sprites"]
    assert inspect_dataset("sprites", tmp_path)["splits"]["val"]["count"] == 24


# --- DataModule ----------------------------------------------------------------------------------


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_datamodule_batches_are_deterministic_with_workers(sprites_root: Path) -> None:
    data_dir = sprites_root / "lmdb" / "sprites"
    serial = ImageDataModule(data_dir, batch_size=16, seed=5)
    parallel = ImageDataModule(data_dir, batch_size=16, seed=5, num_workers=2)
    assert serial.metadata["counts"] == {"train": 72, "val": 24}
    assert serial.metadata["label_names"] == ["shape", "scale", "rotation", "x", "y", "hue"]
    images, labels = _epoch(serial.train_dataloader())
    # one pass by default: 4 whole batches of 16 (the 8 images left over open the next epoch)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (64, 6)
    assert len({tuple(y.tolist()) for y in labels}) == 64  # each image at most once
    first = _epoch(parallel.train_dataloader())
    assert torch.equal(first[0], images) and torch.equal(first[1], labels)

    # the training images are the split's as stored: flips are drawn in the training step
    plain = serial.dataset("train")
    rows = {tuple(plain[i][1].tolist()): plain[i][0] for i in range(len(plain))}
    assert all(torch.equal(rows[tuple(y.tolist())], x) for x, y in zip(images, labels, strict=True))
    assert not torch.equal(labels, torch.stack([plain[i][1] for i in range(64)]))  # shuffled

    # batches are indexed by step: a run resumed at step 2 deals the last two batches of the pass
    resumed = ImageDataModule(data_dir, batch_size=16, seed=5, start_step=2)
    assert torch.equal(_epoch(resumed.train_dataloader())[1], labels[32:])
    other_seed = ImageDataModule(data_dir, batch_size=16, seed=6)
    assert not torch.equal(_epoch(other_seed.train_dataloader())[1], labels)

    val_images, _ = _epoch(serial.val_dataloader())  # validation: in order, every image once
    assert torch.equal(val_images, torch.stack([serial.dataset("val")[i][0] for i in range(24)]))


def test_datamodule_transform_and_expected_shape(sprites_root: Path) -> None:
    data_dir = sprites_root / "lmdb" / "sprites"
    module = ImageDataModule(data_dir, batch_size=8, transform=lambda x: x.float() / 255)
    images, _ = next(iter(module.val_dataloader()))
    assert images.dtype == torch.float32 and float(images.max()) <= 1.0
    shape = r"sprites/train holds images of shape \(3, 64, 64\) but this run expects \(3, 32, 32\)"
    with pytest.raises(DatasetError, match=shape):
        ImageDataModule(data_dir, batch_size=8, image_shape=(3, 32, 32))
    missing = r"nowhere/train not found: convert the dataset first \(dvc repro convert@nowhere\)"
    with pytest.raises(DatasetNotFoundError, match=missing):
        ImageDataModule(sprites_root / "lmdb" / "nowhere", batch_size=8)


def test_datamodule_drives_a_lightning_fit(sprites_root: Path) -> None:
    import pytorch_lightning as pl

    class Mean(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, _):
            images, _ = batch
            return (images.float().mean() - self.bias) ** 2

        def validation_step(self, batch, _):
            self.log("val", batch[0].float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    # 6 steps of 16 from 72 images: the run goes on into the second epoch's order
    module = ImageDataModule(sprites_root / "lmdb" / "sprites", batch_size=16, steps=6)
    trainer = pl.Trainer(
        max_steps=6,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        use_distributed_sampler=False,
    )
    trainer.fit(Mean(), datamodule=module)
    assert trainer.global_step == 6


# --- inspect and the stage scripts ---------------------------------------------------------------


def test_inspect_reports_every_split(sprites_root: Path) -> None:
    summary = inspect_dataset("sprites", sprites_root)
    assert summary["splits"]["train"] == {
        "count": 72,
        "shape": [3, 64, 64],
        "dtype": "uint8",
        "label_names": ["shape", "scale", "rotation", "x", "y", "hue"],
        "label_sizes": [4, 2, 4, 4, 4, 4],
    }
    with pytest.raises(DatasetNotFoundError, match=r"dvc repro convert@cifar10"):
        inspect_dataset("cifar10", sprites_root)


def _run_stage(script: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, name])
    monkeypatch.syspath_prepend(str(REPO / "stages"))  # as `python stages/<script>` has it
    runpy.run_path(str(REPO / "stages" / script), run_name="__main__")


def test_stage_scripts_download_and_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"datasets": {"sprites": SPRITES, "cifar10": {"image_size": 32}}})
    )
    monkeypatch.chdir(tmp_path)
    _run_stage("download.py", "sprites", monkeypatch)
    _run_stage("convert.py", "sprites", monkeypatch)
    assert '"count": 72' in capsys.readouterr().out
    assert inspect_dataset("sprites")["splits"]["val"]["count"] == 24
    with pytest.raises(SystemExit, match=r"error: datasets.cifar10.channels: missing"):
        _run_stage("download.py", "cifar10", monkeypatch)
    with pytest.raises(SystemExit, match=r"error: datasets.mnist: no such dataset"):
        _run_stage("convert.py", "mnist", monkeypatch)
