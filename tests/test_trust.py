"""Nothing runs from data or checkpoints, no reader dies without a message, write failures say so.

Each test plays one attack or accident for real: a planted pickle in a CIFAR archive or in a
checkpoint (a marker file shows whether its code ran), an unverified or unpinned archive, a
truncated or byte-flipped LMDB (read by `inspect`, the DataModule, train and evaluate), another
dataset's LMDB under this dataset's name, and a write past the file size limit (RLIMIT_FSIZE
in a subprocess) during download, conversion and checkpointing. Readers that could die of
SIGBUS run in subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sdn.data.datamodule import ImageDataModule
from sdn.data.lmdb_store import LMDBImageDataset, SplitMetadata, inspect_dataset, write_split
from sdn.data.sources import convert_dataset
from sdn.errors import CheckpointError, ChecksumError, DatasetError
from sdn.training.checkpoints import LAST_CHECKPOINT, AtomicCheckpointIO
from sdn.training.module import load_ema_model
from tests.dataset_files import cifar_archive, python2_pickle
from tests.network_tools import FileServer, serving
from tests.pipeline_project import Project
from tests.reliability_tools import EXPERIMENT, Workdir, stage_process, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this runs `touch <marker>`: what a crafted pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# Raw files: checked at conversion, and unpickled without running anything


def _cifar_batches(rng: np.random.Generator) -> dict:
    return {
        n: (rng.integers(0, 256, (k, 3072), dtype=np.uint8), rng.integers(0, 10, k).tolist())
        for n, k in (("data_batch_1", 4), ("test_batch", 2))
    }


def _place(tmp_path: Path, archive: bytes) -> dict:
    """Put `archive` by hand where download@cifar10 would; the settings pinning its md5."""
    raw = tmp_path / "raw" / "cifar10"
    raw.mkdir(parents=True)
    (raw / "cifar-10-python.tar.gz").write_bytes(archive)
    return {"image_size": 32, "channels": 3, "url": "https://example.invalid/cifar-10-python.tar.gz",
            "md5": hashlib.md5(archive).hexdigest()}


def _planted_archive(marker: Path) -> bytes:
    archive = cifar_archive(_cifar_batches(np.random.default_rng(0)), [b"c%d" % i for i in range(10)])
    import io
    import tarfile

    # the same archive with data_batch_1 swapped for a pickle that runs a command
    source, out = tarfile.open(fileobj=io.BytesIO(archive)), io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith("data_batch_1"):
                data = python2_pickle({b"data": RunsCode(marker), b"labels": [0]})
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def test_planted_pickle_in_a_pinned_archive_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cfg = _place(tmp_path, _planted_archive(marker))  # even pinned: the checksum is no licence to run code
    with pytest.raises(DatasetError, match=r"data_batch_1 refers to posix.system, which CIFAR-10's batches "
                                           r"never hold: .*not unpickled"):
        convert_dataset("cifar10", cfg, tmp_path / "raw", tmp_path / "lmdb")
    assert not marker.exists()
    assert not (tmp_path / "lmdb" / "cifar10").exists()


def test_hand_placed_archive_with_the_wrong_checksum_is_not_converted(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cfg = _place(tmp_path, _planted_archive(marker))
    cfg["md5"] = "0" * 32
    mismatch = r"checksum mismatch for .*cifar-10-python.tar.gz: expected md5 0{32}"
    with pytest.raises(ChecksumError, match=mismatch):
        convert_dataset("cifar10", cfg, tmp_path / "raw", tmp_path / "lmdb")
    assert not marker.exists() and not (tmp_path / "lmdb" / "cifar10").exists()


def test_unpinned_archive_is_not_converted_and_the_message_says_how_to_pin_it(tmp_path: Path) -> None:
    archive = cifar_archive(_cifar_batches(np.random.default_rng(0)), [b"c%d" % i for i in range(10)])
    cfg = _place(tmp_path, archive)
    del cfg["md5"]
    cfg["sha256"] = None
    with pytest.raises(ChecksumError) as info:
        convert_dataset("cifar10", cfg, tmp_path / "raw", tmp_path / "lmdb")
    digest = hashlib.sha256(archive).hexdigest()
    assert f"Its sha256 is {digest}" in str(info.value) and "`sdn pin cifar10` writes it" in str(info.value)
    assert not (tmp_path / "lmdb" / "cifar10").exists()


def test_metadata_records_the_checksum_computed_from_the_file_read(tmp_path: Path) -> None:
    archive = cifar_archive(_cifar_batches(np.random.default_rng(0)), [b"c%d" % i for i in range(10)])
    cfg = _place(tmp_path, archive)
    cfg["md5"] = cfg["md5"].upper()  # the same pin, spelt otherwise: the record is what was computed
    out = convert_dataset("cifar10", cfg, tmp_path / "raw", tmp_path / "lmdb")
    from sdn.data.lmdb_store import read_metadata

    assert read_metadata(out / "train").source == {"url": cfg["url"], "md5": hashlib.md5(archive).hexdigest()}


# ---------------------------------------------------------------------------------------------
# Checkpoints: weights only


@pytest.fixture
def trained(tmp_path: Path) -> Workdir:
    workdir = Workdir(tmp_path)
    workdir.train(tiny_cfg(max_steps=2))
    return workdir


def _plant(path: Path, marker: Path) -> None:
    """The real checkpoint, with one more entry that runs a command when unpickled."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["extra"] = RunsCode(marker)
    torch.save(checkpoint, path)


def test_planted_checkpoint_runs_nothing_in_evaluation_or_resume(
    trained: Workdir, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = trained.root / "ran"
    path = trained.ckpt / LAST_CHECKPOINT
    _plant(path, marker)
    cfg = tiny_cfg(max_steps=2)
    with pytest.raises(CheckpointError, match=r"cannot be read \(UnpicklingError.*dvc repro train@"):
        load_ema_model(cfg, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)  # what Lightning's trainer.fit(ckpt_path=...) calls
    assert not marker.exists()
    capsys.readouterr()
    trained.train(tiny_cfg(max_steps=4))  # set aside, never resumed
    assert "cannot be read" in capsys.readouterr().out
    assert not marker.exists()


def test_checkpoints_hold_only_what_weights_only_loading_accepts(trained: Workdir) -> None:
    checkpoint = torch.load(trained.ckpt / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"] and checkpoint["loops"]


# ---------------------------------------------------------------------------------------------
# Damaged LMDB: truncated, a flipped byte, another dataset's


def _flip_a_byte_of_record(split: Path, index: int) -> None:
    """Flip one bit in the image bytes of record `index` in data.mdb."""
    image, labels = LMDBImageDataset(split)[index]
    value = image.numpy().tobytes() + labels.numpy().astype("<i8").tobytes()
    data_file = split / "data.mdb"
    data = bytearray(data_file.read_bytes())
    # copy-on-write leaves stale copies of a page in the file: flip the record wherever it lies
    at = data.find(value)
    assert at > 0
    while at != -1:
        data[at + 5] ^= 0x10
        at = data.find(value, at + 1)
    data_file.write_bytes(bytes(data))


def _truncate(split: Path) -> None:
    data_file = split / "data.mdb"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])


READERS = {
    "inspect": [sys.executable, "-m", "sdn", "inspect", "photos32"],
    "datamodule": [sys.executable, "-c", textwrap.dedent("""
        from sdn.data.datamodule import ImageDataModule
        from sdn.errors import DataError
        try:
            module = ImageDataModule("data/lmdb/photos32", batch_size=4)
            for _ in module.val_dataloader():
                pass
        except DataError as error:
            raise SystemExit(f"error: {error}")
    """)],
    "train": [sys.executable, "stages/train.py", EXPERIMENT],
    "evaluate": [sys.executable, "stages/evaluate.py", EXPERIMENT],
}


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    workdir.train(tiny_cfg(max_steps=2))  # evaluate needs a checkpoint
    yield project


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_lmdb_gives_the_named_error_in_every_reader(
    project: Project, reader: str, damage: str
) -> None:
    split = project.root / "data" / "lmdb" / "photos32" / "val"  # every reader reads all of val
    if damage == "truncated":
        _truncate(split)
        expected = "error: data/lmdb/photos32/val/data.mdb is truncated ("
    else:
        _flip_a_byte_of_record(split, 7)
        expected = "error: photos32/val record 7 fails its checksum (crc32c "
    done = subprocess.run(READERS[reader], cwd=project.root, env=project.env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode in (1, 2), f"{reader}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    assert "dvc repro convert@photos32" in last


def test_flipped_byte_is_caught_in_dataloader_workers_with_the_named_error(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    _flip_a_byte_of_record(workdir.lmdb / "train", 3)
    module = ImageDataModule(workdir.lmdb, batch_size=8, num_workers=2, dataset="photos32")
    with pytest.raises(DatasetError, match=r"photos32/train record 3 fails its checksum"):
        for _ in module.train_dataloader():
            pass


def test_another_datasets_lmdb_is_refused(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    for split, count in (("train", 64), ("val", 21)):  # same shape, same labels: only the name differs
        shutil.rmtree(workdir.lmdb / split)
        images = np.random.default_rng(0).integers(0, 256, (count, 3, 8, 8), dtype=np.uint8)
        write_split(workdir.lmdb / split, [(images, np.zeros((count, 1), np.int64))],
                    SplitMetadata(dataset="cifar10", split=split, count=0, shape=(3, 8, 8),
                                  label_names=("photo",), label_sizes=(3,)))
    message = r"holds dataset 'cifar10' but 'photos32' is expected here: it was converted for something else"
    with pytest.raises(DatasetError, match=message):
        workdir.train(tiny_cfg(max_steps=2))
    with pytest.raises(DatasetError, match=message):
        ImageDataModule(workdir.lmdb, batch_size=4)
    with pytest.raises(DatasetError, match=message):
        inspect_dataset("photos32", tmp_path / "data")
    assert not workdir.ckpt.exists()


def test_a_split_under_the_other_splits_name_is_refused(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    shutil.rmtree(workdir.lmdb / "val")
    shutil.copytree(workdir.lmdb / "train", workdir.lmdb / "val")
    with pytest.raises(DatasetError, match=r"val holds split 'train' but 'val' is expected"):
        workdir.train(tiny_cfg(max_steps=2))


# ---------------------------------------------------------------------------------------------
# Local write failures: named, not retried


def _limited(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def _run_limited(
    args: list[str], cwd: Path, limit: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python *args` with writes limited to files of `limit` bytes (RLIMIT_FSIZE)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False, preexec_fn=_limited(limit),
                          env=env or {**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as httpd:
        yield httpd


def test_file_size_limit_during_download_is_named_and_not_retried(server: FileServer, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    server.files["/big.bin"] = payload
    script = textwrap.dedent(f"""
        from pathlib import Path
        from sdn.errors import DataError
        from sdn.data.download import fetch
        try:
            fetch({server.url("/big.bin")!r}, Path("raw/big.bin"), "md5",
                  {hashlib.md5(payload).hexdigest()!r}, rerun="python stages/download.py x",
                  pin_key="datasets.x.md5")
        except DataError as error:
            raise SystemExit(f"error: {{type(error).__name__}}: {{error}}")
    """)
    done = _run_limited(["-c", script], tmp_path, 1 << 20)
    last = done.stderr.strip().splitlines()[-1]
    named = "error: LocalWriteError: file size limit reached while writing raw/big.bin.part:"
    assert last.startswith(named), last
    assert "cannot reach" not in last and "rerun `python stages/download.py x`" in last
    assert len(server.requests) == 1  # not retried as a cut connection


def test_file_size_limit_during_conversion_is_named(tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    done = stage_process(project, "download", "photos32")
    assert done.returncode == 0, done.stderr[-2000:]
    done = _run_limited(["stages/convert.py", "photos32"], project.root, 256 << 10, project.env)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: file size limit (262144 bytes, `ulimit -f`) reached while writing "), last
    assert "rerun `dvc repro convert@photos32`" in last and "Traceback" not in done.stderr
    assert not (project.root / "data" / "lmdb" / "photos32").exists()


def test_file_size_limit_while_checkpointing_is_named(tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    done = _run_limited(["stages/train.py", EXPERIMENT], project.root, 16 << 10, project.env)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: file size limit (16384 bytes, `ulimit -f`) reached while writing the "
                           f"checkpoint data/checkpoints/{EXPERIMENT}/last.ckpt"), last
    assert "Traceback" not in done.stderr
    assert not workdir.ckpt.exists() or not list(workdir.ckpt.iterdir())  # no half file left


# ---------------------------------------------------------------------------------------------
# Stages: a known failure is one `error:` line and exit status 1; --help says what a stage writes

STAGE_FAILURES = {
    # stage: (arguments, the error line's start) in a fresh project without any data
    "download": (["mnist"], "error: datasets.mnist: no such dataset in params.yaml"),
    "convert": (["photos32"], "error: data/raw/photos32/info.json not found: fetch the raw data with"),
    "train": ([EXPERIMENT], "error: data/lmdb/photos32/train not found: convert the dataset first"),
    "evaluate": ([EXPERIMENT], f"error: data/checkpoints/{EXPERIMENT}/last.ckpt not found: train"),
    "sample": ([EXPERIMENT], f"error: data/checkpoints/{EXPERIMENT}/last.ckpt not found: train"),
    "summary": ([], "error: trainer.num_workers: must be between 0 and 256, got -2."),
}


@pytest.fixture(scope="module")
def bare_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("bare") / "project")


@pytest.mark.parametrize("stage", list(STAGE_FAILURES))
def test_every_stage_ends_a_known_failure_with_one_error_line(bare_project: Project, stage: str) -> None:
    args, expected = STAGE_FAILURES[stage]
    params = bare_project.read_params()
    if stage == "summary":  # nothing to miss: a bad knob instead
        params["trainer"]["num_workers"] = -2
    (bare_project.root / "params.yaml").rename(bare_project.root / "params.yaml.keep")
    bare_project.write_params(params)
    try:
        done = bare_project.run(sys.executable, f"stages/{stage}.py", *args, check=False)
    finally:
        (bare_project.root / "params.yaml.keep").replace(bare_project.root / "params.yaml")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == errors[0]


def test_every_stage_has_help_and_a_usage_line(bare_project: Project) -> None:
    stages = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "repo_root")
    assert stages == ["comparison", "convert", "download", "evaluate", "release", "sample", "summary",
                      "train"]
    for stage in stages:
        done = bare_project.run(sys.executable, f"stages/{stage}.py", "--help", check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(f"usage: python stages/{stage}.py"), done.stdout
        assert "Writes" in done.stdout or "writes" in done.stdout or stage == "summary", done.stdout
        assert "metrics/summary" in done.stdout or stage != "summary"
    wrong = bare_project.run(sys.executable, "stages/train.py", "a", "b", check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().startswith("usage: python stages/train.py <experiment>")


def test_an_error_from_a_dataloader_worker_is_reported_as_its_own_message() -> None:
    from sdn.pipeline import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            raise DatasetError("photos32/train record 3 fails its checksum: rebuild it")

    with pytest.raises(DatasetError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what the worker's error arrives as
    assert one_line(info.value) == "photos32/train record 3 fails its checksum: rebuild it"
