"""The step-time benchmark runs and names bad input (the others are exercised by `make bench`); the
GPU check's scripts run on the CPU and add up what they measure."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.evaluation_workdir import EvaluationWorkdir, micro_experiment, micro_project_params
from tests.pipeline_project import REPO


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/step_time.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_step_time_reports_both_runs_and_their_ratio() -> None:
    result = bench("photos32-sdn", "--repeats", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"photos32-sdn +batch +32 +[\d,]+ parameters +\d+\.\d{3} s", result.stdout)
    assert re.search(r"photos32-cnn +batch +32 +[\d,]+ parameters +\d+\.\d{3} s", result.stdout)
    assert re.search(r"photos32-sdn / photos32-cnn: \d+\.\d\d", result.stdout)


def test_step_time_needs_a_run_with_a_baseline() -> None:
    result = bench("photos32-cnn", "--repeats", "1")
    assert result.returncode != 0 and "has no baseline" in result.stderr


# ---------------------------------------------------------------------------------------------
# The GPU check (`make gpu-check`) and its step benchmark, tried on the CPU


def run_script(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def micro_workdir(root: Path) -> None:
    """params.yaml of micro runs (8x8 photos32) and random converted splits of 48 and 12 images."""
    (root / "params.yaml").write_text(yaml.safe_dump(micro_project_params("photos32-cnn"), sort_keys=False))
    EvaluationWorkdir(root, micro_experiment("photos32-cnn"))


def test_gpu_step_measures_a_micro_run_and_projects_its_hours(tmp_path: Path) -> None:
    micro_workdir(tmp_path)
    out = tmp_path / "figures.json"
    done = run_script("gpu_step.py", "photos32-cnn", "--device", "cpu", "--repeats", "1", "--out", str(out),
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["splits"] == [48, 12] and result["micro_batches_per_step"] == 1
    assert list(result["precisions"]) == ["32-true", "bf16-mixed"]  # its own, then bf16-mixed
    for precision, figures in result["precisions"].items():
        assert f"  {precision} " in done.stdout
        step, hours = figures["step_s"], figures["hours"]
        assert step == pytest.approx(figures["micro_batch_s"] + figures["update_s"])
        assert figures["images_per_s"] == pytest.approx(8 / step)  # micro train.batch_size: 8
        assert hours["train"] * 3600 == pytest.approx(4 * step)  # micro max_steps: 4
        # validations at steps 2 and 4, each over the 12 images (val_batches 1 of 16)
        assert hours["validation"] * 3600 == pytest.approx(2 * 12 * figures["val_row_s"])
        # evaluation: 2 importance samples of each of the 12 images, forwards of 32 rows
        assert figures["eval_rows"] == 32
        assert hours["evaluation"] * 3600 == pytest.approx(12 * 2 * figures["eval_row_s"])
        assert hours["total"] == pytest.approx(hours["train"] + hours["validation"] + hours["evaluation"])
        assert figures["peak_memory_gib"] is None  # a GPU's allocator statistic


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_cuda_is_skipped_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = run_script("gpu_check.py", "--out", str(out))
    assert done.returncode == 0
    assert done.stdout.strip() == (
        "gpu-check: no CUDA device is visible: skipped (nothing run, nothing written)."
    )
    assert not out.exists()
    step = run_script("gpu_step.py", "cifar10-sdn")
    assert step.returncode == 2 and "no CUDA device is visible" in step.stderr


def test_make_gpu_hours_add_up_both_runs_of_a_dataset() -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def measured(own: str, own_hours: float | None, bf16_hours: float) -> dict:
        return {"precisions": {own: {"hours": {"total": own_hours}},
                               "bf16-mixed": {"hours": {"total": bf16_hours}}}}

    presets = {
        "cifar10-sdn": measured("16-mixed", 30.0, 20.0),
        "cifar10-cnn": measured("32-true", 10.0, 4.0),
        "celebahq256-sdn": measured("16-mixed", None, 7.0),  # evaluation not projected
        "celebahq256-cnn": measured("16-mixed", 5.0, 3.0),
        "3dshapes-sdn": {"experiment": "3dshapes-sdn", "skipped": "the time budget ran out"},
    }
    assert gpu_check.dataset_hours(presets) == {
        "cifar10": {"as_configured": 40.0, "bf16_mixed": 24.0},
        "celebahq256": {"as_configured": None, "bf16_mixed": 10.0},
        "3dshapes": {"as_configured": None, "bf16_mixed": None},
    }


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    micro_workdir(tmp_path)
    out = tmp_path / "gpu_check.json"
    done = run_script("gpu_check.py", "--device", "cpu", "--experiments", "photos32-sdn", "photos32-cnn",
                      "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pipeline"]["passed"] and " skipped in " in result["pipeline"]["summary"]  # no CUDA here
    assert sorted(result["presets"]) == ["photos32-cnn", "photos32-sdn"]
    totals = [preset["precisions"]["32-true"]["hours"]["total"] for preset in result["presets"].values()]
    assert result["make_gpu_hours"]["photos32"]["as_configured"] == pytest.approx(sum(totals))
    assert f"gpu-check: figures in {out}" in done.stdout
