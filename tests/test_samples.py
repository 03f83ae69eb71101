"""The sample stage: torchvision grids, and a folder that always holds exactly one run's pictures."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdn.atomic import recover_dir
from sdn.evaluation import samples as pictures
from sdn.evaluation.run import sample_experiment
from tests.evaluation_workdir import REPO, EvaluationWorkdir, micro_experiment, write_params

NAME = "photos32-cnn"
IMAGE_SIZE = 8  # photos32 at micro size (see tests/evaluation_workdir.py)


def folder_digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


@pytest.fixture
def work(tmp_path: Path) -> EvaluationWorkdir:
    return EvaluationWorkdir(tmp_path, micro_experiment(NAME))


def sample(work: EvaluationWorkdir, **sample_section) -> list[Path]:
    cfg = micro_experiment(NAME, sample=sample_section) if sample_section else work.cfg
    return sample_experiment(cfg, work.lmdb, work.ckpt, work.metrics / "samples")


def test_grids_are_torchvisions_enlarged_under_a_title(work: EvaluationWorkdir) -> None:
    written = sample(work)
    out = work.metrics / "samples"
    assert sorted(path.name for path in written) == sorted(path.name for path in out.iterdir()) == [
        "interpolation_l1.png", "nearest_train.png", "neighbourhood.png", "samples_t1.png",
    ]
    grid = np.asarray(Image.open(out / "samples_t1.png").convert("RGB"))
    scale = pictures.upscale_factor(IMAGE_SIZE)
    assert scale * IMAGE_SIZE >= pictures.MIN_SHOWN_SIZE and scale >= 3
    # 2x2 samples of 8x8 pixels with a 2-pixel white border around and between them, every pixel
    # a scale x scale block, under a title band
    side = (2 * (IMAGE_SIZE + 2) + 2) * scale
    assert grid.shape == (pictures.TITLE_HEIGHT + side, side, 3)
    body, band = grid[pictures.TITLE_HEIGHT :], grid[: pictures.TITLE_HEIGHT]
    assert (band < 128).any(), "the title is drawn in the band above the grid"
    small = body[::scale, ::scale]
    assert np.array_equal(np.repeat(np.repeat(small, scale, 0), scale, 1), body), "nearest neighbour only"
    assert (small[:2] == 255).all() and (small[:, IMAGE_SIZE + 2 : IMAGE_SIZE + 4] == 255).all()
    assert leftovers(work.metrics) == []


def test_titles_name_the_experiment_and_the_temperature(
    work: EvaluationWorkdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles = {}
    original = pictures.save_grid

    def record(images, path, nrow, title=None, scale=1):
        titles[path.name] = title
        original(images, path, nrow, title, scale)

    monkeypatch.setattr(pictures, "save_grid", record)
    sample(work, temperatures=[1.0, 0.8])
    assert titles["samples_t1.png"] == f"{NAME} · samples, T = 1"
    assert titles["samples_t0.8.png"] == f"{NAME} · samples, T = 0.8"
    assert all(title.startswith(f"{NAME} · ") for title in titles.values())


def test_a_title_that_does_not_fit_is_still_drawn_and_the_grid_is_unchanged(tmp_path: Path) -> None:
    images = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    plain = pictures.grid_picture(images, nrow=2, scale=3)
    titled = np.asarray(pictures.grid_picture(images, nrow=2, title="x" * 200, scale=3).convert("RGB"))
    assert np.array_equal(titled[pictures.TITLE_HEIGHT :], np.asarray(plain.convert("RGB")))
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        pictures.grid_picture(images, nrow=2, scale=0)


def test_save_grid_matches_torchvision_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    from torchvision.utils import save_image

    images = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    pictures.save_grid(images, tmp_path / "mine.png", nrow=3)
    save_image(images, tmp_path / "reference.png", nrow=3, padding=2, pad_value=1.0)
    mine, reference = (np.asarray(Image.open(tmp_path / name)) for name in ("mine.png", "reference.png"))
    assert np.array_equal(mine, reference)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.png", "reference.png"]


def test_temperatures_no_longer_configured_do_not_stay(work: EvaluationWorkdir) -> None:
    sample(work, temperatures=[1.0, 0.8])
    assert {"samples_t1.png", "samples_t0.8.png"} <= set(os.listdir(work.metrics / "samples"))
    sample(work, temperatures=[0.5])
    names = set(os.listdir(work.metrics / "samples"))
    assert "samples_t0.5.png" in names and not names & {"samples_t1.png", "samples_t0.8.png"}


def test_nearest_images_use_the_runs_sampling_temperature(
    work: EvaluationWorkdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = pictures.sample_grid

    def recording(model, n, temperature):
        calls.append((n, temperature))
        return original(model, n, temperature)

    monkeypatch.setattr(pictures, "sample_grid", recording)
    sample(work, temperatures=[0.7, 1.0])
    nearest_samples = work.cfg.sample.nearest_samples
    assert (nearest_samples, 0.7) in calls and (nearest_samples, 1.0) not in calls


def test_a_failure_midway_keeps_the_previous_pictures(
    work: EvaluationWorkdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample(work)
    before = folder_digest(work.metrics / "samples")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pictures, "neighbourhood", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample(work, temperatures=[0.5])
    assert folder_digest(work.metrics / "samples") == before
    assert leftovers(work.metrics) == []


KILL_AFTER_TWO_PICTURES = textwrap.dedent("""
    import os, runpy, signal, sys
    from sdn.evaluation import samples
    original, saved = samples.save_grid, []

    def save_then_die(images, path, *args):
        original(images, path, *args)
        saved.append(path)
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    samples.save_grid = save_then_die
    script = os.path.join(os.environ["SDN_REPO"], "stages", "sample.py")
    sys.argv = [script, sys.argv[1]]
    sys.path.insert(0, os.path.dirname(script))  # as `python stages/sample.py` has it
    runpy.run_path(script, run_name="__main__")
""")


def test_a_sample_stage_killed_midway_leaves_the_previous_folder_intact(work: EvaluationWorkdir) -> None:
    root = work.root
    env = {**os.environ, "SDN_REPO": str(REPO)}

    def stage(*command: str, temperatures: list[float]) -> subprocess.CompletedProcess:
        write_params(root, NAME, sample={"temperatures": temperatures})
        return subprocess.run(
            [sys.executable, *command, NAME], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )

    done = stage(str(REPO / "stages" / "sample.py"), temperatures=[1.0])
    assert done.returncode == 0, done.stderr
    before = folder_digest(root / "metrics" / NAME / "samples")

    killed = stage("-c", KILL_AFTER_TWO_PICTURES, temperatures=[0.5, 0.6])
    assert killed.returncode == -9, killed.stderr
    assert folder_digest(root / "metrics" / NAME / "samples") == before
    assert leftovers(root / "metrics" / NAME), "the killed run's half-built folder was expected"

    done = stage(str(REPO / "stages" / "sample.py"), temperatures=[0.5, 0.6])
    assert done.returncode == 0, done.stderr
    names = set(os.listdir(root / "metrics" / NAME / "samples"))
    assert {"samples_t0.5.png", "samples_t0.6.png"} <= names and "samples_t1.png" not in names
    assert leftovers(root / "metrics" / NAME) == []


def test_recover_puts_back_a_folder_renamed_away_by_a_killed_swap(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    old = tmp_path / ".samples.old"
    old.mkdir()
    (old / "samples_t1.png").write_bytes(b"old picture")
    (tmp_path / ".samples.4242-ab12cd34.tmp").mkdir()  # the new folder, never swapped in
    recover_dir(out)
    assert (out / "samples_t1.png").read_bytes() == b"old picture"
    assert leftovers(tmp_path) == []
