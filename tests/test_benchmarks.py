"""The step-time benchmark runs and names bad input (the others are exercised by `make bench`)."""

from __future__ import annotations

import re
import subprocess
import sys

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
