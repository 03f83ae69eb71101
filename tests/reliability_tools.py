"""Helpers of the reliability tests, shared with the other tests that train a micro model: a micro
experiment on random 8x8 images run in this process (`Workdir`, `tiny_cfg`), callbacks that crash
or poison a run at a given step, and a fault injector loaded by the subprocesses of the stage runs
(`faulty_env`, `leftover_processes`).

Their fixtures (`workdir`, `faults_dir`, `isolated_torch`) are in tests/conftest.py.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from sdn.config import ExperimentConfig, experiment_config
from sdn.data.lmdb_store import SplitMetadata, write_split
from sdn.data.sources import convert_dataset, download_dataset
from sdn.evaluation.run import evaluate_experiment
from sdn.params import load_params
from sdn.pipeline import stage_code
from sdn.registry import enabled_runs, write_registry
from sdn.training.checkpoints import LAST_CHECKPOINT
from sdn.training.run import train_experiment
from tests.params_tools import detach, section_of, write_params_files
from tests.pipeline_project import Project, micro_params

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "photos32-cnn"
IMAGE_SIZE = 8  # micro images: the whole pipeline, seconds per run
TRAIN_IMAGES, VAL_IMAGES = 64, 21  # an odd validation split


# ---------------------------------------------------------------------------------------------
# Helpers: a micro experiment on random images, run in this process


def own_experiment(params: dict[str, Any]) -> dict[str, Any]:
    """EXPERIMENT's section, with a base of its own: editing it changes no other experiment."""
    return detach(params, EXPERIMENT)


def tiny_params(**train: Any) -> dict[str, Any]:
    """params.yaml with micro experiments, photos32 at 8x8 and `train` overrides for EXPERIMENT."""
    params = micro_params(load_params(REPO / "params.yaml"))
    params["datasets"]["photos32"]["image_size"] = IMAGE_SIZE
    params["trainer"].update(accelerator="cpu", log_every_n_steps=1)
    experiment = own_experiment(params)
    experiment["train"].update({"batch_size": 4, "max_steps": 6, "val_every_steps": 2, **train})
    section_of(params, EXPERIMENT, "evaluate").update(max_images=VAL_IMAGES)
    return params


def tiny_cfg(**train: Any) -> ExperimentConfig:
    return experiment_config(tiny_params(**train), EXPERIMENT)


def write_random_split(
    path: Path, count: int, size: int = IMAGE_SIZE, seed: int = 0, dataset: str = "photos32"
) -> None:
    images = np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    labels = np.zeros((count, 1), dtype=np.int64)
    meta = SplitMetadata(
        dataset=dataset,
        split=path.name,
        count=0,
        shape=(3, size, size),
        label_names=("photo",),
        label_sizes=(3,),
    )
    write_split(path, [(images, labels)], meta)


class Workdir:
    """A project root for in-process runs: params.yaml, data/lmdb/photos32 of random images."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lmdb = root / "data" / "lmdb" / "photos32"
        self.ckpt = root / "data" / "checkpoints" / EXPERIMENT
        self.metrics = root / "metrics" / EXPERIMENT
        self.stale = root / "data" / "stale-checkpoints"
        write_random_split(self.lmdb / "train", TRAIN_IMAGES, seed=1)
        write_random_split(self.lmdb / "val", VAL_IMAGES, seed=2)
        self.write_params(tiny_params())

    def write_params(self, params: dict[str, Any]) -> None:
        write_params_files(self.root, params, lambda data: yaml.safe_dump(data, sort_keys=False))

    def train(self, cfg: ExperimentConfig, callbacks: list[pl.Callback] | None = None):
        # the code the train stage records: runs here and stage runs resume each other's checkpoints
        return train_experiment(
            cfg, self.lmdb, self.ckpt, self.metrics, self.stale, callbacks, code=stage_code("train")
        )

    def evaluate(self, cfg: ExperimentConfig) -> dict:
        return evaluate_experiment(cfg, self.lmdb, self.ckpt, self.metrics)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def last_checkpoint(root: Path) -> dict[str, Any]:
    return load_checkpoint(root / "data" / "checkpoints" / EXPERIMENT / LAST_CHECKPOINT)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tolerance) -> None:
    assert got.keys() == want.keys()
    assert any(name.startswith("ema.") for name in got) and any(name.startswith("model.") for name in got)
    for name in want:
        if tolerance:
            torch.testing.assert_close(got[name], want[name], **tolerance, msg=name)
        else:
            assert torch.equal(got[name], want[name]), name


def run_stage_here(root: Path, script: str, name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run `stages/<script>.py <name>` in this process from `root`: its exit message, '' if none."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [f"stages/{script}.py", name])
    monkeypatch.syspath_prepend(str(REPO / "stages"))  # as `python stages/<script>.py` has it
    try:
        runpy.run_path(str(REPO / "stages" / f"{script}.py"), run_name="__main__")
    except SystemExit as stop:
        return str(stop.code)
    return ""


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Stands in for a lost machine: raises when optimizer step `step` (1-based) begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            raise SimulatedCrash(f"simulated crash at step {self.step}")


class PoisonGradients(pl.Callback):
    """Makes optimizer step `step` (1-based) produce NaN weights from a still finite loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            for parameter in module.model.parameters():
                if parameter.grad is not None:  # the top layer's bottom-up output is unused
                    parameter.grad.fill_(float("nan"))


# ---------------------------------------------------------------------------------------------
# Helpers: subprocesses with a fault injector


FAULTS = '''\
"""Fault injection for the reliability tests, loaded by the tests' subprocesses only.

SDN_TEST_KILL_AT="event|needle|n": SIGKILL this process at the n-th audit event `event` whose
first or second argument contains `needle` (e.g. the rename that publishes a finished file).
SDN_TEST_WRITE_LOG=file, SDN_TEST_WATCH=dir: append "rank<TAB>event<TAB>path" to `file` for each
write, rename, removal or mkdir below `dir`/metrics or `dir`/data/checkpoints, and a "start"
line with the process id when the process starts. The rank is LOCAL_RANK, "main" in the process
that starts a run.
"""
import os
import signal
import sys

_KILL = os.environ.get("SDN_TEST_KILL_AT")
_LOG = os.environ.get("SDN_TEST_WRITE_LOG")
_ROOT = os.environ.get("SDN_TEST_WATCH", "/nonexistent")
_WATCH = [os.path.join(_ROOT, "metrics"), os.path.join(_ROOT, "data", "checkpoints")]
_WRITES = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.move")
_seen = 0
_busy = False


def _log(event, path):
    global _busy
    _busy = True  # the log's own open() must not be logged
    try:
        with open(_LOG, "a") as log:
            log.write(f"{os.environ.get('LOCAL_RANK', 'main')}\\t{event}\\t{path}\\n")
    finally:
        _busy = False


def _writes(event, args):
    if event == "open":
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return event in _WRITES


def _hook(event, args):
    global _seen
    if _busy or not args:
        return
    if _KILL:
        wanted, needle, count = _KILL.split("|")
        if event == wanted and any(needle in str(a) for a in args[:2]):
            _seen += 1
            if _seen == int(count):
                os.kill(os.getpid(), signal.SIGKILL)
    if _LOG and _writes(event, args):
        target = args[1] if event in ("os.rename", "shutil.move") else args[0]  # where it lands
        if isinstance(target, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(target))
            if any(path.startswith(w) for w in _WATCH):
                _log(event, path)


if _LOG:
    _log("start", os.getpid())
sys.addaudithook(_hook)
'''


def faulty_env(project: Project, faults_dir: Path, **settings: str) -> dict[str, str]:
    """The project's environment with the fault injector loaded (settings: SDN_TEST_* values, or
    others such as SDN_CPU_DEVICES), every process it starts marked for `leftover_processes`."""
    env = project.env
    env["PYTHONPATH"] = f"{project.root}{os.pathsep}{faults_dir}"
    env["SDN_TEST_PROJECT"] = str(project.root)
    env.update(settings)
    return env


def leftover_processes(project: Project, local_rank: str | None = None) -> list[int]:
    """Processes still running (not zombies) that were started with the project's mark
    (SDN_TEST_PROJECT, see `faulty_env`): ranks, loader workers, anything they started; with
    `local_rank`, those whose LOCAL_RANK is that (a rank and its loader workers)."""
    wanted = {f"SDN_TEST_PROJECT={project.root}".encode()}
    if local_rank is not None:
        wanted.add(f"LOCAL_RANK={local_rank}".encode())
    found = []
    for proc in Path("/proc").iterdir():
        try:
            marked = wanted <= set((proc / "environ").read_bytes().split(b"\0"))
            running = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):  # not a process folder, gone, or not ours to read
            continue
        if marked and running:
            found.append(int(proc.name))
    return found


def stage_process(
    project: Project, script: str, name: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"stages/{script}.py", name],
        cwd=project.root,
        env=env or project.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def set_experiment(project: Project, section: str, **values: Any) -> None:
    params = project.read_params()
    own_experiment(params)
    section_of(params, EXPERIMENT, section).update(values)
    project.write_params(params)
    write_registry(params, enabled_runs(project.root), project.root)  # the stages track its new base


def micro_photos(project: Project) -> None:
    """The project's photos32 at 8x8: its params, raw files and LMDB (built in this process)."""
    params = project.read_params()
    params["datasets"]["photos32"]["image_size"] = IMAGE_SIZE
    params["trainer"].update(accelerator="cpu", log_every_n_steps=1)
    project.write_params(params)
    cfg = params["datasets"]["photos32"]
    download_dataset("photos32", cfg, project.root / "data" / "raw")
    convert_dataset("photos32", cfg, project.root / "data" / "raw", project.root / "data" / "lmdb")


def outputs(project: Project) -> list[str]:
    """Everything training or evaluation could have written."""
    roots = [
        project.root / "data" / "checkpoints",
        project.root / "metrics" / EXPERIMENT,
        project.root / "data" / "stale-checkpoints",
    ]
    found = (p for root in roots if root.exists() for p in root.rglob("*"))
    return sorted(str(p.relative_to(project.root)) for p in found)
