"""Evaluate and sample run on the experiment's accelerator, under its precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdn.errors import ConfigError
from sdn.evaluation.device import autocast_dtype, precision_context, precision_used, select_device
from sdn.evaluation.run import evaluate_experiment, sample_experiment
from sdn.models.density import DensityVAE
from tests.evaluation_workdir import EvaluationWorkdir, micro_experiment

CPU, GPU0 = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("accelerator", "devices", "cuda_available", "expected"),
    [
        ("auto", 1, False, CPU),
        ("auto", 1, True, GPU0),
        ("auto", 8, True, GPU0),  # several devices: evaluation uses the first
        ("cpu", 1, True, CPU),
        ("cpu", 1, False, CPU),
        ("gpu", 1, True, GPU0),
        ("cuda", 1, True, GPU0),
        ("gpu", "2,3", True, torch.device("cuda", 2)),  # Lightning's list of GPU indices
        ("gpu", "auto", True, GPU0),
    ],
)
def test_select_device(accelerator: str, devices, cuda_available: bool, expected: torch.device) -> None:
    assert select_device(accelerator, devices, cuda_available=cuda_available) == expected


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_asking_for_a_gpu_without_one_is_a_clear_error(accelerator: str) -> None:
    message = f"trainer.accelerator: '{accelerator}' asks for a GPU but CUDA is not available"
    with pytest.raises(ConfigError, match=message):
        select_device(accelerator, cuda_available=False)


def test_unknown_accelerator_is_named() -> None:
    with pytest.raises(ConfigError, match="'tpu' is not supported.*auto, cpu, gpu, cuda"):
        select_device("tpu", cuda_available=True)


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [
        ("16-mixed", GPU0, torch.float16),
        ("16-mixed", CPU, None),  # fp16 autocast is a GPU thing: a CPU evaluates in fp32
        ("bf16-mixed", GPU0, torch.bfloat16),
        ("bf16-mixed", CPU, torch.bfloat16),
        ("32-true", GPU0, None),
        ("32", CPU, None),
    ],
)
def test_autocast_dtype(precision: str, device: torch.device, expected) -> None:
    assert autocast_dtype(precision, device) == expected


@pytest.mark.parametrize(
    ("precision", "device", "logged"),
    [
        ("32-true", CPU, "float32"),
        ("32", GPU0, "float32"),
        ("16-mixed", GPU0, "float16 autocast"),
        ("16-mixed", CPU, "float32, not trainer.precision 16-mixed"),  # what a CPU really does
        ("bf16-mixed", CPU, "bfloat16 autocast"),
        ("64-true", CPU, "float32, not trainer.precision 64-true"),  # the checkpoint's float32 weights
    ],
)
def test_precision_used_names_the_arithmetic_not_the_setting(precision: str, device: torch.device,
                                                               logged: str) -> None:
    assert precision_used(precision, device) == logged


def test_precision_context_autocasts_on_cpu_for_bf16() -> None:
    with precision_context("bf16-mixed", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_context("32-true", CPU):
        assert not torch.is_autocast_enabled("cpu")


@pytest.fixture
def spy_elbo(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.device, bool]]:
    """Records, for every ELBO the evaluation asks for, the input's device and whether autocast
    was on."""
    calls: list[tuple[torch.device, bool]] = []
    original = DensityVAE.elbo

    def elbo(self, x):
        calls.append((x.device, torch.is_autocast_enabled(x.device.type)))
        return original(self, x)

    monkeypatch.setattr(DensityVAE, "elbo", elbo)
    return calls


@pytest.mark.parametrize(
    ("precision", "autocast", "logged"),
    [
        ("32-true", False, "float32"),
        ("bf16-mixed", True, "bfloat16 autocast"),
        ("16-mixed", False, "float32, not trainer.precision 16-mixed"),  # no float16 autocast on CPU
    ],
)
def test_evaluate_runs_on_the_configured_device_and_precision_and_logs_what_it_used(
    tmp_path: Path, spy_elbo: list, capsys: pytest.CaptureFixture, precision: str, autocast: bool, logged: str
) -> None:
    cfg = micro_experiment("photos32-cnn", trainer={"precision": precision})
    work = EvaluationWorkdir(tmp_path, cfg)
    metrics = evaluate_experiment(cfg, work.lmdb, work.ckpt, work.metrics)
    assert spy_elbo and set(spy_elbo) == {(CPU, autocast)}
    (line,) = [line for line in capsys.readouterr().out.splitlines() if ": evaluated " in line]
    assert f"on cpu ({logged}) in " in line
    assert json.loads((work.metrics / "eval.json").read_text()) == metrics
    for key in ("neg_elbo_bpd", "nll_bpd", "kl_bpd"):
        assert metrics[f"{key}_se"] > 0


def test_sample_logs_the_precision_it_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = micro_experiment("photos32-cnn", trainer={"precision": "16-mixed"})
    work = EvaluationWorkdir(tmp_path, cfg)
    written = sample_experiment(cfg, work.lmdb, work.ckpt, work.metrics / "samples")
    (line,) = [line for line in capsys.readouterr().out.splitlines() if ": drew " in line]
    assert line.startswith(f"[sdn] photos32-cnn: drew {len(written)} pictures on cpu "
                           "(float32, not trainer.precision 16-mixed) in ")


def test_gpu_asked_without_one_stops_before_any_work(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = micro_experiment("photos32-cnn", trainer={"accelerator": "gpu"})
    work = EvaluationWorkdir(tmp_path, cfg)
    for stage, out in ((evaluate_experiment, work.metrics), (sample_experiment, work.metrics / "samples")):
        with pytest.raises(ConfigError, match="asks for a GPU but CUDA is not available"):
            stage(cfg, work.lmdb, work.ckpt, out)
    assert not work.metrics.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_evaluates_and_samples_on_the_gpu(
    tmp_path: Path, spy_elbo: list, capsys: pytest.CaptureFixture
) -> None:
    cfg = micro_experiment("photos32-cnn", trainer={"accelerator": "auto", "precision": "16-mixed"})
    work = EvaluationWorkdir(tmp_path, cfg)
    evaluate_experiment(cfg, work.lmdb, work.ckpt, work.metrics)
    assert {device.type for device, _ in spy_elbo} == {"cuda"} and all(on for _, on in spy_elbo)
    written = sample_experiment(cfg, work.lmdb, work.ckpt, work.metrics / "samples")
    assert all(path.is_file() for path in written)
    output = capsys.readouterr().out
    logged = [line for line in output.splitlines() if line.startswith("[sdn] photos32-cnn: ")]
    assert len(logged) == 2 and all("on cuda:0 (float16 autocast) in " in line for line in logged)
