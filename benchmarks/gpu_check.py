"""`make gpu-check`: the project on a GPU, in one command that fits in 10 minutes on one H100.

1. The pipeline on CUDA: `tests/test_gpu.py` runs a tiny real `dvc repro` of one density and one
   β-VAE experiment (train, evaluate, sample) under 16-mixed, with loader workers and pinned
   memory, in a throw-away copy of the project, and one training run in this process that checks
   where each part ran.
2. Every paper preset at its own precision and micro-batch, and under bf16-mixed
   (`benchmarks/gpu_step.py`, one process per preset): micro-batch and optimizer-step time, peak
   memory, images per second, projected GPU-hours; summed per dataset, the GPU-hours of
   `make <dataset>` (both runs, training and evaluation) on this GPU.

All figures go to one JSON file (default benchmarks/gpu_check.json). Without CUDA it says so and
does nothing (exit 0), so CI runs it anywhere. It exits 1 if the pipeline check fails or a
preset's measurement fails; a preset left out for lack of time is marked `skipped` in the file.

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check.json] [--budget-s 540]

Run it from the repository root (the presets are read from ./params.yaml, split sizes from ./data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# What `make <dataset>` trains and evaluates: <dataset>-sdn and <dataset>-cnn.
PAPER_PRESETS = ["cifar10-sdn", "cifar10-cnn", "imagenet32-sdn", "imagenet32-cnn", "celebahq256-sdn",
                 "celebahq256-cnn", "3dshapes-sdn", "3dshapes-cnn"]
# A preset's measurement is started only with this much of the budget left, and never given longer.
PRESET_SECONDS = 150


def pipeline_check(budget_s: float) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"],
        cwd=REPO, capture_output=True, text=True, timeout=budget_s, check=False,
    )
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"gpu-check: pipeline on CUDA: {summary}")
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    seconds = round(time.monotonic() - started, 1)
    return {"passed": done.returncode == 0, "summary": summary, "seconds": seconds}


def measure_preset(name: str, device: str, timeout_s: float) -> dict[str, Any]:
    """`gpu_step.py <name>` in its own process (an out-of-memory or a CUDA error stays there),
    from the working directory (params.yaml, data/)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        command = [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), name, "--device", device,
                   "--out", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"experiment": name, "skipped": f"not measured within {timeout_s:.0f} s"}
        print(done.stdout.strip())
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"experiment": name, "error": f"gpu_step.py exited {done.returncode}: {tail}"}
        return json.loads(out.read_text())


def dataset_hours(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """GPU-hours of `make <dataset>` on this GPU: the totals of its runs (`<dataset>-sdn`,
    `<dataset>-cnn`), at their own precisions (as `make` runs them) and all under bf16-mixed;
    None where a run was not measured."""
    def total(results: list[dict[str, Any]], precision: str | None) -> float | None:
        hours = []
        for result in results:
            measured = result.get("precisions", {})
            # gpu_step.py measures the run's own precision first
            figures = measured.get(precision) if precision else next(iter(measured.values()), None)
            value = (figures or {}).get("hours", {}).get("total")
            if value is None:
                return None
            hours.append(value)
        return sum(hours)

    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for name, result in presets.items():
        by_dataset.setdefault(name.rsplit("-", 1)[0], []).append(result)
    return {
        dataset: {"as_configured": total(results, None), "bf16_mixed": total(results, "bf16-mixed")}
        for dataset, results in by_dataset.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting measurements after this")
    parser.add_argument("--device", default="cuda", help="cpu: the same steps on the CPU (to try the script)")
    parser.add_argument("--experiments", nargs="+", help="measure these instead of every paper preset")
    parser.add_argument("--skip-pipeline", action="store_true", help="measure only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible: skipped (nothing run, nothing written).")
        return 0
    started = time.monotonic()

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "pipeline": None if args.skip_pipeline else pipeline_check(left()),
        "presets": {},
    }
    names = args.experiments or PAPER_PRESETS
    for name in names:
        if left() < PRESET_SECONDS / 3:
            result["presets"][name] = {"experiment": name, "skipped": "the time budget ran out"}
            continue
        result["presets"][name] = measure_preset(name, args.device, min(PRESET_SECONDS, left()))
    result["make_gpu_hours"] = dataset_hours(result["presets"])
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for dataset, hours in result["make_gpu_hours"].items():
        print(f"gpu-check: make {dataset}: {hours['as_configured']} GPU-hours as configured, "
              f"{hours['bf16_mixed']} under bf16-mixed")
    print(f"gpu-check: figures in {args.out} ({result['seconds']} s)")
    failed = (result["pipeline"] is not None and not result["pipeline"]["passed"]) or any(
        "error" in figures for figures in result["presets"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
