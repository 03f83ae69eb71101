"""`python -m sdn inspect` and `python -m sdn readme`, run as the user runs them: subprocesses, on
temporary data and a temporary copy of README.md (the checkout is only read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.evaluation_workdir import REPO, EvaluationWorkdir, micro_experiment

START, END = "<!-- results:start -->", "<!-- results:end -->"


def sdn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdn", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_reports_every_split(tmp_path: Path):
    EvaluationWorkdir(tmp_path, micro_experiment("sprites-cnn"), train_images=10, val_images=4)
    done = sdn("inspect", "sprites", "--data-root", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dataset"] == "sprites"
    assert Path(report["path"]) == tmp_path / "data" / "lmdb" / "sprites"
    assert report["splits"] == {
        split: {"count": count, "shape": [3, 64, 64], "dtype": "uint8",
                "label_names": ["factor0", "factor1"], "label_sizes": [2, 3]}
        for split, count in (("train", 10), ("val", 4))
    }


def test_inspect_reads_data_under_the_working_directory_by_default(tmp_path: Path):
    EvaluationWorkdir(tmp_path, micro_experiment("photos32-cnn"), train_images=6, val_images=2)
    done = sdn("inspect", "photos32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {s: v["count"] for s, v in json.loads(done.stdout)["splits"].items()} == {"train": 6, "val": 2}


def test_inspect_a_dataset_not_converted(tmp_path: Path):
    done = sdn("inspect", "cifar10", "--data-root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "dvc repro convert@cifar10" in lines[0]


def test_inspect_finds_a_damaged_record(tmp_path: Path):
    work = EvaluationWorkdir(tmp_path, micro_experiment("photos32-cnn"), train_images=6, val_images=2)
    database = work.lmdb / "val" / "data.mdb"
    data = bytearray(database.read_bytes())
    # EvaluationWorkdir's images: default_rng(0) draws the training images, then these
    rng = np.random.default_rng(0)
    rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    image = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)[1].tobytes()
    at = data.find(image)
    assert at >= 0  # stored as raw bytes
    while at >= 0:  # every copy (LMDB's copy-on-write can leave an older page holding it too)
        data[at + 100] ^= 0xFF
        at = data.find(image, at + 1)
    database.write_bytes(bytes(data))
    done = sdn("inspect", "photos32", "--data-root", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    error = done.stderr.strip().splitlines()[-1]  # after the verification's progress bars
    assert error.startswith("error: ") and "photos32/val" in error, error
    assert "dvc repro convert@photos32" in error


# ---------------------------------------------------------------------------------------------
# readme


SUMMARY = """# Results

## Density estimation (bits/dim)

| experiment | neg_elbo_bpd |
|:--|--:|
| photos32-sdn | 5.81 |
"""


@pytest.fixture
def readme_copy(tmp_path: Path) -> Path:
    readme = (REPO / "README.md").read_text()
    assert START in readme and END in readme
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "summary.md").write_text(SUMMARY)
    return tmp_path


def test_readme_takes_the_summary_table_between_the_markers(readme_copy: Path):
    before = (readme_copy / "README.md").read_text()
    done = sdn("readme", cwd=readme_copy)
    assert done.returncode == 0, done.stderr
    after = (readme_copy / "README.md").read_text()
    head, rest = after.split(START)
    block, tail = rest.split(END)
    # outside the markers nothing moves
    assert head == before.split(START)[0] and tail == before.split(END)[1]
    # inside: the summary without its title, its headings demoted below the README's own
    assert "# Results" not in block and "#### Density estimation (bits/dim)" in block
    assert "| photos32-sdn | 5.81 |" in block
    # running it again changes nothing
    assert sdn("readme", cwd=readme_copy).returncode == 0
    assert (readme_copy / "README.md").read_text() == after
    assert (REPO / "README.md").read_text() != after  # the checkout's README was not the one written


def test_readme_without_a_summary_is_a_one_line_error(readme_copy: Path):
    (readme_copy / "metrics" / "summary.md").unlink()
    before = (readme_copy / "README.md").read_text()
    done = sdn("readme", cwd=readme_copy)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "summary.md" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (readme_copy / "README.md").read_text() == before


def test_readme_without_markers_is_refused_and_left_alone(readme_copy: Path):
    text = "# A README someone rewrote\n\nNo results block here.\n"
    (readme_copy / "README.md").write_text(text)
    done = sdn("readme", cwd=readme_copy)
    assert done.returncode != 0
    assert START in done.stderr and END in done.stderr  # the message names what is missing
    assert (readme_copy / "README.md").read_text() == text
