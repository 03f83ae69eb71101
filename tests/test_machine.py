"""A run's `devices` fitted to the machine (sdn/training/machine.py): the global batch kept by
accumulation on fewer accelerators, the line that says so, the fingerprint that does not see the
split, and a paper preset refused on a machine without a GPU.

That a fitted run trains as DDP does, step by step, is proven by the slow tests of
tests/test_reliability.py (2 CPU processes against 1 accumulating 2, and a run switching between
them at a checkpoint)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sdn.config import ExperimentConfig, experiment_config
from sdn.data.datamodule import ImageDataModule
from sdn.errors import ConfigError
from sdn.params import load_params
from sdn.training.checkpoints import config_fingerprint, load_checkpoint_file, micro_batches_per_step
from sdn.training.machine import fit_to_machine
from sdn.training.module import VAEModule, recount_micro_batches
from sdn.training.run import train_experiment
from tests.pipeline_project import MICRO_DENSITY, REPO, Project
from tests.reliability_tools import leftover_processes, write_random_split

PARAMS = load_params(REPO / "params.yaml")
PAPER_DENSITY_RUNS = ["cifar10-sdn", "cifar10-cnn", "imagenet32-sdn", "imagenet32-cnn", "celebahq256-sdn",
                      "celebahq256-cnn"]


def preset(name: str, train: dict[str, Any] | None = None, **trainer: Any) -> ExperimentConfig:
    """Experiment `name` as committed, with `trainer` and `train` settings replaced."""
    cfg = experiment_config(PARAMS, name)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer),
                               train=dataclasses.replace(cfg.train, **(train or {})))


def fit(name: str, gpus: int, cpu_devices: int = 1, **trainer: Any):
    return fit_to_machine(preset(name, **trainer), gpus=gpus, cpu_devices=cpu_devices)


# ---------------------------------------------------------------------------------------------
# The fit


@pytest.mark.parametrize(
    ("gpus", "processes", "micro_batches", "strategy", "summary"),
    [
        (1, 1, 8, "auto", "cifar10-sdn: 8 devices asked, 1 GPU visible: 8 micro-batches of 32 per step "
                          "(global batch 256, as configured)"),
        (2, 2, 4, "ddp", "cifar10-sdn: 8 devices asked, 2 GPUs visible: 2 processes x 4 micro-batches of 32 "
                         "per step (global batch 256, as configured)"),
        (4, 4, 2, "ddp", "cifar10-sdn: 8 devices asked, 4 GPUs visible: 4 processes x 2 micro-batches of 32 "
                         "per step (global batch 256, as configured)"),
        (8, 8, 1, "ddp", None),  # the release's machine: nothing to fit
        (16, 8, 1, "ddp", None),  # more than asked: the run takes what it asks for
    ],
)
def test_paper_preset_keeps_its_global_batch_on_fewer_gpus(gpus, processes, micro_batches, strategy, summary):
    fitted = fit("cifar10-sdn", gpus)
    assert (fitted.accelerator, fitted.processes, fitted.micro_batches) == ("gpu", processes, micro_batches)
    assert fitted.launches_ranks == (processes > 1)
    assert (fitted.strategy, fitted.precision, fitted.summary) == (strategy, "16-mixed", summary)
    assert fitted.processes * fitted.micro_batches * 32 == 256  # the release's global batch


def test_the_fit_multiplies_a_configured_accumulation():
    fitted = fit_to_machine(preset("celebahq256-sdn", train={"accumulate_grad_batches": 2}), gpus=2)
    assert (fitted.processes, fitted.micro_batches) == (2, 8)
    assert fitted.summary == ("celebahq256-sdn: 8 devices asked, 2 GPUs visible: 2 processes x 8 "
                              "micro-batches of 4 per step (global batch 64, as configured)")


@pytest.mark.parametrize(("gpus", "named"), [
    (3, "make 2 or 1 visible, e.g. CUDA_VISIBLE_DEVICES=0,1"),
    (7, "make 4, 2 or 1 visible, e.g. CUDA_VISIBLE_DEVICES=0,1,2,3"),
])
def test_a_gpu_count_that_does_not_divide_devices_names_the_counts_that_would(gpus, named):
    with pytest.raises(ConfigError) as error:
        fit("imagenet32-sdn", gpus)
    assert str(error.value) == (
        f"experiments.imagenet32-sdn.trainer.devices: 8 asked, but {gpus} GPUs do not divide 8, so the "
        f"global batch cannot be kept: {named}."
    )


def test_cpu_counts_as_one_device_and_trains_a_16_mixed_preset_in_32_bits():
    fitted = fit("cifar10-sdn", gpus=1, accelerator="cpu")  # a visible GPU is not used when cpu is asked
    assert (fitted.accelerator, fitted.processes, fitted.micro_batches) == ("cpu", 1, 8)
    assert (fitted.strategy, fitted.precision) == ("auto", "32-true")
    assert fitted.summary == (
        "cifar10-sdn: 8 devices asked, accelerator cpu (one device): 8 micro-batches of 32 per step (global "
        "batch 256, as configured); 16-mixed is a GPU precision: training in 32-true on the CPU"
    )
    bf16 = fit("cifar10-sdn", gpus=0, accelerator="cpu", precision="bf16-mixed")
    assert bf16.precision == "bf16-mixed"  # CPU autocast has bfloat16: kept as configured
    several = fit("cifar10-sdn", gpus=0, cpu_devices=2, accelerator="cpu")
    assert (several.processes, several.micro_batches, several.strategy) == (2, 4, "ddp")


def test_cpu_devices_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SDN_CPU_DEVICES", "2")
    cfg = preset("cifar10-sdn", accelerator="cpu")
    assert fit_to_machine(cfg, gpus=0).processes == 2
    monkeypatch.setenv("SDN_CPU_DEVICES", "two")
    with pytest.raises(ConfigError, match="SDN_CPU_DEVICES='two': expected a positive number"):
        fit_to_machine(cfg, gpus=0)


@pytest.mark.parametrize("name", ["photos32-sdn", "sprites-cnn", "3dshapes-sdn"])
def test_one_device_runs_are_left_as_configured(name):
    on_cpu, on_gpu = fit(name, gpus=0), fit(name, gpus=2)
    cfg = preset(name)
    for fitted, accelerator in ((on_cpu, "cpu"), (on_gpu, "gpu")):
        assert (fitted.accelerator, fitted.processes, fitted.micro_batches) == (
            accelerator, 1, cfg.train.accumulate_grad_batches)
        assert (fitted.strategy, fitted.precision) == ("auto", str(cfg.trainer.precision))
        assert fitted.summary is None
        assert fitted.run_config(cfg).train == cfg.train


class DataOpened(Exception):
    pass


def test_training_on_a_gpu_reads_batches_from_pinned_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # (tests/test_gpu.py watches the loader of a real GPU run; here the request, on any machine)
    pinned = []

    def opened(cls, cfg, lmdb_dir, splits=("train", "val"), pin_memory=False):
        pinned.append(pin_memory)
        raise DataOpened

    monkeypatch.setattr(ImageDataModule, "for_experiment", classmethod(opened))
    cfg = preset("photos32-cnn")
    for gpus in (1, 0):
        with pytest.raises(DataOpened):
            train_experiment(cfg, tmp_path, tmp_path, tmp_path, fit=fit_to_machine(cfg, gpus=gpus))
    assert pinned == [True, False]


# ---------------------------------------------------------------------------------------------
# No GPU, no paper run


@pytest.mark.parametrize("name", PAPER_DENSITY_RUNS)
def test_a_gpu_preset_without_a_gpu_is_refused_with_how_to_run_it_on_the_cpu(name):
    cfg = preset(name)
    with pytest.raises(ConfigError) as error:
        fit_to_machine(cfg, gpus=0)
    key = f"experiments.{name}.trainer"
    mixed = cfg.trainer.precision == "16-mixed"
    wants = f"{key}.devices: 8" + (f" and {key}.precision: 16-mixed ask" if mixed else " asks")
    assert str(error.value) == (
        f"{wants} for GPUs, but this machine has none that torch can use: run it on a GPU machine, or set "
        f"{key}.accelerator: cpu to run it anyway on the CPU (one process, 8 micro-batches of "
        f"{cfg.train.batch_size} per step{', in 32-true' if mixed else ''})."
    )


@pytest.mark.parametrize(("trainer", "named"), [
    ({"precision": "bf16-mixed"}, "experiments.photos32-sdn.trainer.precision: bf16-mixed asks for GPUs"),
    ({"accelerator": "gpu"}, "experiments.photos32-sdn.trainer.accelerator: gpu asks for GPUs"),
    ({"accelerator": "cuda", "devices": 2}, "experiments.photos32-sdn.trainer.devices: 2 asks for GPUs"),
])
def test_gpu_settings_of_any_run_are_refused_without_a_gpu(trainer, named):
    with pytest.raises(ConfigError, match=f"^{named}, but this machine has none"):
        fit("photos32-sdn", gpus=0, **trainer)


def test_several_nodes_and_device_lists_are_left_to_lightning():
    nodes = fit("cifar10-sdn", gpus=1, num_nodes=2)  # each node's launcher starts its processes
    assert (nodes.processes, nodes.micro_batches, nodes.strategy) == (8, 1, "ddp")
    assert not nodes.launches_ranks
    listed = fit("cifar10-sdn", gpus=2, devices="0,1")
    assert (listed.processes, listed.micro_batches, listed.launches_ranks) == ("0,1", 1, False)


def test_an_unknown_accelerator_is_named():
    with pytest.raises(ConfigError, match=r"accelerator: 'tpu' is not supported; use one of auto, cpu"):
        fit("photos32-sdn", gpus=0, accelerator="tpu")


# ---------------------------------------------------------------------------------------------
# The fingerprint: the global batch, not its split


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_a_fitted_run_has_the_configured_runs_fingerprint(gpus):
    cfg = preset("cifar10-sdn")
    run = fit_to_machine(cfg, gpus=gpus).run_config(cfg)
    assert (run.trainer.devices, run.train.accumulate_grad_batches) == (min(gpus, 8), 8 // min(gpus, 8))
    assert micro_batches_per_step(run) == micro_batches_per_step(cfg) == 8
    assert config_fingerprint(run) == config_fingerprint(cfg)


def test_the_fingerprint_sees_the_global_batch_not_its_split():
    def edited(devices: int, accumulate: int, batch_size: int = 32) -> str:
        train = {"accumulate_grad_batches": accumulate, "batch_size": batch_size}
        return config_fingerprint(preset("cifar10-sdn", train=train, devices=devices))

    release = edited(8, 1)
    assert edited(1, 8) == edited(2, 4) == edited(4, 2) == release  # one run, resumable on any machine
    assert edited(4, 1) != release  # half the global batch: another run
    assert edited(8, 2, batch_size=16) != release  # the same global batch of other micro-batches:
    # free bits act on each micro-batch, so that is another run too


# ---------------------------------------------------------------------------------------------
# The train stage with the committed cifar10-sdn preset


def cifar10_project(root: Path, **trainer: Any) -> Project:
    """A project whose cifar10-sdn is the committed preset, or, with `trainer`, the committed
    preset with `trainer` added, its model and run shrunk to seconds (the rest of its trainer
    section as committed) and random CIFAR-shaped data of one global batch and a bit."""
    project = Project(root)
    if not trainer:
        return project
    paper = root / "paper.yaml"  # where the paper's runs are defined
    params = yaml.safe_load(paper.read_text())
    experiment = params["experiments"]["cifar10-sdn"]
    experiment["trainer"].update(trainer)
    # deep enough for the preset's sample settings (interpolation_layers [4, 5])
    experiment["model"].update({**MICRO_DENSITY, "depth": 6, "ds_list": [5], "sdn_max_scale": 16})
    train = experiment.setdefault("train", {})
    train.update(max_steps=2, val_every_steps=2, val_batches=1, ckpt_every_steps=2)
    paper.write_text(yaml.safe_dump(params, sort_keys=False))
    lmdb = root / "data" / "lmdb" / "cifar10"
    write_random_split(lmdb / "train", 300, size=32, seed=1, dataset="cifar10")
    write_random_split(lmdb / "val", 16, size=32, seed=2, dataset="cifar10")
    return project


def train_stage(project: Project, name: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**project.env, "OMP_NUM_THREADS": "1", "SDN_TEST_PROJECT": str(project.root)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "stages/train.py", name], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    return done, time.monotonic() - started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_committed_cifar10_preset_on_a_cpu_machine_stops_at_once_with_one_error_line(tmp_path: Path):
    project = cifar10_project(tmp_path / "project")
    done, seconds = train_stage(project, "cifar10-sdn")
    assert done.returncode == 1 and seconds < 60
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith(
        "error: experiments.cifar10-sdn.trainer.devices: 8 and experiments.cifar10-sdn.trainer.precision: "
        "16-mixed ask for GPUs, but this machine has none that torch can use"
    )
    assert "set experiments.cifar10-sdn.trainer.accelerator: cpu to run it anyway" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (project.root / "data" / "checkpoints").exists()
    assert leftover_processes(project) == []


@pytest.mark.slow
def test_cifar10_preset_with_accelerator_cpu_trains_in_one_process_of_8_micro_batches(tmp_path: Path):
    project = cifar10_project(tmp_path / "project", accelerator="cpu")
    done, _ = train_stage(project, "cifar10-sdn")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("[sdn] cifar10-sdn: 8 devices asked, accelerator cpu (one device): 8 micro-batches of 32 per "
            "step (global batch 256, as configured); 16-mixed is a GPU precision: training in 32-true on the "
            "CPU") in done.stdout.splitlines()
    assert "Starting with" not in done.stderr and "distributed" not in done.stderr  # one process, no DDP
    checkpoint = load_checkpoint_file(project.root / "data" / "checkpoints" / "cifar10-sdn" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["sdn_micro_batches"] == 8
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 16
    params = load_params(project.root / "params.yaml")  # with the project's paper.yaml, where cifar10-sdn is
    assert checkpoint["sdn_fingerprint"] == config_fingerprint(experiment_config(params, "cifar10-sdn"))
    assert leftover_processes(project) == []


def test_a_checkpoint_read_outside_a_trainer_keeps_its_counters():
    # only a Trainer's resume recounts Lightning's batch counters (sdn.training.module)
    module = VAEModule(experiment_config(PARAMS, "photos32-cnn"))
    counters = {"ready": 8, "started": 8, "processed": 8, "completed": 7}
    checkpoint = {"sdn_micro_batches": 2, "loops": {"fit_loop": {"epoch_loop.batch_progress": {
        "total": dict(counters), "current": dict(counters)}}}}
    module.on_load_checkpoint(checkpoint)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"] == counters
    recount_micro_batches(checkpoint, 8)  # 4 steps of 2 micro-batches, the last not yet completed
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"] == {
        "ready": 32, "started": 32, "processed": 32, "completed": 31}
