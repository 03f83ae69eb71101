"""`sdn pin`: a file kept unverified by its first download (or placed by hand for an import) gets
its checksum written into the parameter file that defines it, one line changed, and is verified
from then on."""

from __future__ import annotations

import difflib
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdn.data.sources import download_dataset
from sdn.errors import ChecksumError
from sdn.params import dataset_config, load_params
from tests.network_tools import FileServer, serving
from tests.pipeline_project import REPO

ARCHIVE = b"GLOW publishes no checksum for this tar\n" * 100


def project(tmp_path: Path, url: str | None = None) -> Path:
    for name in ("params.yaml", "paper.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    if url is not None:  # imagenet32 from the loopback server, the file's layout kept
        paper = tmp_path / "paper.yaml"
        glow = dataset_config(load_params(tmp_path / "params.yaml"), "imagenet32")["url"]
        paper.write_text(paper.read_text().replace(glow, url))
    return tmp_path


def sdn_pin(root: Path, name: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, "-m", "sdn", "pin", name], cwd=root, capture_output=True,
                          text=True, env=env)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as httpd:
        yield httpd


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]


def test_pin_writes_the_kept_downloads_sha256_and_the_file_is_then_verified(
    tmp_path: Path, server: FileServer
) -> None:
    server.files["/imagenet-oord-tfr.tar"] = ARCHIVE
    root = project(tmp_path, server.url("/imagenet-oord-tfr.tar"))
    raw = root / "data" / "raw"
    cfg = dataset_config(load_params(root / "params.yaml"), "imagenet32")
    assert cfg["sha256"] is None  # as committed: GLOW publishes none
    with pytest.raises(ChecksumError) as info:
        download_dataset("imagenet32", cfg, raw)
    digest = hashlib.sha256(ARCHIVE).hexdigest()
    message = str(info.value)
    assert digest in message and "`sdn pin imagenet32`" in message and "`make imagenet32` goes on" in message
    kept = raw / "imagenet32" / "imagenet-oord-tfr.tar.unverified"
    assert kept.read_bytes() == ARCHIVE

    before = (root / "paper.yaml").read_text()
    done = sdn_pin(root, "imagenet32")
    assert done.returncode == 0, done.stderr
    assert f"pinned datasets.imagenet32.sha256: {digest} in paper.yaml" in done.stdout
    assert "`make imagenet32` goes on" in done.stdout
    after = (root / "paper.yaml").read_text()
    assert changed_lines(before, after) == ["-     sha256:", f"+     sha256: {digest}"]

    requests = len(server.requests)
    pinned = dataset_config(load_params(root / "params.yaml"), "imagenet32")
    assert pinned["sha256"] == digest
    folder = download_dataset("imagenet32", pinned, raw)
    assert (folder / "imagenet-oord-tfr.tar").read_bytes() == ARCHIVE and not kept.exists()
    assert len(server.requests) == requests  # verified as kept, not fetched again
    assert "already" in sdn_pin(root, "imagenet32").stdout


def test_pin_writes_the_authors_checkpoints_sha256(tmp_path: Path) -> None:
    root = project(tmp_path)
    placed = root / "data" / "raw" / "celebahq256-release" / "CelebAHQ256.ckpt"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"placed by hand")
    before = (root / "paper.yaml").read_text()
    done = sdn_pin(root, "celebahq256-release")
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(b"placed by hand").hexdigest()
    lines = changed_lines(before, (root / "paper.yaml").read_text())
    assert len(lines) == 2 and lines[1].startswith(f"+       sha256: {digest}")
    assert lines[1].endswith("# none published: the first import prints the file's sha256 to pin here")
    release = load_params(root / "params.yaml")["experiments"]["celebahq256-release"]["release"]
    assert release["sha256"] == digest


@pytest.mark.parametrize(("name", "expected"), [
    ("photos32", "built offline, from no downloaded file"),
    ("cifar10-sdn", "trained here, from no published file"),
    ("cifar100", "neither a downloaded dataset nor an imported experiment. Did you mean 'cifar10'?"),
    ("imagenet32", "no file to pin for imagenet32 at data/raw/imagenet32/imagenet-oord-tfr.tar: run `make "
                   "imagenet32` first"),
])
def test_pin_refuses_with_one_line_that_says_why(tmp_path: Path, name: str, expected: str) -> None:
    root = project(tmp_path)
    before = {file: (root / file).read_text() for file in ("params.yaml", "paper.yaml")}
    done = sdn_pin(root, name)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert {file: (root / file).read_text() for file in before} == before


def test_a_different_pin_is_not_overwritten(tmp_path: Path) -> None:
    root = project(tmp_path)
    cifar = root / "data" / "raw" / "cifar10" / "cifar-10-python.tar.gz"
    cifar.parent.mkdir(parents=True)
    cifar.write_bytes(b"not the CIFAR-10 archive")
    done = sdn_pin(root, "cifar10")
    assert done.returncode == 2 and "is pinned to c58f30108f718f92721af3b95e74349a" in done.stderr
