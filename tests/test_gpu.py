"""The pipeline on a CUDA GPU: what `make gpu-check` runs first (benchmarks/gpu_check.py). Every
test here is skipped without CUDA; on CPU-only machines the same code paths are covered by the
meta-device and bf16-mixed tests (tests/test_models.py, tests/test_training_wiring.py).

* a tiny real `dvc repro` of one density and one β-VAE run (train, evaluate, sample) under
  16-mixed with loader workers, in a throw-away copy of the project;
* one micro training run in this process, watched from inside: the batches arrive on the GPU from
  pinned memory through worker processes, the forward runs under float16 autocast with a gradient
  scaler, and evaluation and sampling follow on the GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from sdn.evaluation.run import evaluate_experiment, sample_experiment
from sdn.training.run import train_experiment
from tests.evaluation_workdir import EvaluationWorkdir, micro_experiment
from tests.pipeline_project import Project

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUNS = ("photos32-sdn", "sprites-sdn")  # an SDN-VAE and an SDN β-VAE: the sweep runs in both


def test_dvc_repro_of_a_density_and_a_beta_vae_run_on_cuda(tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    params = project.read_params()
    params["trainer"].update(accelerator="auto", precision="16-mixed", num_workers=2)
    project.write_params(params)
    targets = [f"{stage}@{name}" for name in RUNS for stage in ("evaluate", "sample")]
    done = project.dvc("repro", *targets, timeout=480)
    log = done.stdout + done.stderr
    assert log.count("GPU available: True (cuda), used: True") == len(RUNS), log[-4000:]
    for name in RUNS:
        assert f"[sdn] {name}: evaluated" in log and "on cuda:0 (16-mixed)" in log
        metrics = json.loads((project.root / "metrics" / name / "eval.json").read_text())
        assert all(math.isfinite(metrics[key]) for key in ("neg_elbo_bpd", "nll_bpd", "kl_bpd"))
        assert list((project.root / "metrics" / name / "samples").glob("samples_t*.png"))
    assert "factor_vae" in json.loads((project.root / "metrics" / "sprites-sdn" / "eval.json").read_text())
    assert "changed" not in project.dvc("status", *targets).stdout  # every stage recorded as done


class WhereItRuns(pl.Callback):
    """The loader's settings, each batch's device and memory, and the forward's autocast dtype."""

    def __init__(self) -> None:
        self.loader: dict[str, object] = {}
        self.batches: list[tuple[str, bool]] = []
        self.autocast: list[torch.dtype | None] = []
        self.scaler = None

    def on_train_start(self, trainer, module) -> None:
        loader = trainer.train_dataloader
        self.loader = {"pin_memory": loader.pin_memory, "num_workers": loader.num_workers,
                       "device": trainer.strategy.root_device.type}
        self.scaler = getattr(trainer.precision_plugin, "scaler", None)

        def record(model, args, out) -> None:
            if model.training:
                on = torch.is_autocast_enabled("cuda")
                self.autocast.append(torch.get_autocast_dtype("cuda") if on else None)

        module.model.register_forward_hook(record)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append((batch[0].device.type, batch[0].dtype == torch.uint8))


def test_training_evaluation_and_sampling_run_on_the_gpu_from_pinned_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = micro_experiment("photos32-cnn", trainer={"accelerator": "auto", "precision": "16-mixed",
                                                    "num_workers": 2}, train={"max_steps": 4})
    work = EvaluationWorkdir(tmp_path, cfg)  # random LMDB splits (and a checkpoint this run ignores)
    run = tmp_path / "run"
    seen = WhereItRuns()
    train_experiment(cfg, work.lmdb, run / "checkpoints", run / "metrics", run / "stale", [seen])
    assert seen.loader == {"pin_memory": True, "num_workers": 2, "device": "cuda"}
    assert seen.batches == [("cuda", True)] * 4
    assert seen.autocast == [torch.float16] * 4 and seen.scaler is not None
    metrics = evaluate_experiment(cfg, work.lmdb, run / "checkpoints", run / "metrics")
    assert "on cuda:0 (16-mixed)" in capsys.readouterr().out
    assert math.isfinite(metrics["nll_bpd"])
    written = sample_experiment(cfg, work.lmdb, run / "checkpoints", run / "metrics" / "samples")
    assert written and all(path.is_file() for path in written)
