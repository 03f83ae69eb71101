"""Reliability: every fault is injected for real, and each test checks what is left.

* resume: a crash or SIGKILL mid-run, then the same command again, ends with the weights, curves
  and metrics of an uninterrupted run; damaged checkpoints and those of another configuration
  are set aside, never resumed; a checkpoint is never half-written under its final name;
* processes: DDP on two CPU processes (gloo) equals one process that the machine fit makes
  accumulate the same global batch, step by step, and so does a run that switches between the
  two at a checkpoint; only rank 0 writes, validation sees every image once; a failure in one
  process ends the run with one error line and no process left; accumulating k micro-batches
  equals one k-times larger batch;
* bad input: misspelt or mistyped parameters, corrupt or truncated LMDB, images of the wrong
  size, a missing dataset, a non-finite loss, a full disk and kills while writing outputs.

Fast tests train a micro model on random 8x8 images in this process (`tests.reliability_tools`);
the slow ones run the stage scripts and `dvc repro` as subprocesses on a copy of the project.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from sdn.data.datamodule import ShardSampler, StepBatchSampler
from sdn.data.lmdb_store import read_metadata
from sdn.data.sources import convert_dataset
from sdn.errors import CheckpointError, DataError, DatasetError, NonFiniteLossError
from sdn.training.checkpoints import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    config_fingerprint,
    resumable_checkpoint,
)
from sdn.training.module import load_ema_model
from tests.params_tools import section_of
from tests.pipeline_project import Project
from tests.reliability_tools import (
    EXPERIMENT,
    IMAGE_SIZE,
    CrashAt,
    PoisonGradients,
    SimulatedCrash,
    Workdir,
    assert_same_weights,
    faulty_env,
    last_checkpoint,
    leftover_processes,
    load_checkpoint,
    micro_photos,
    outputs,
    own_experiment,
    run_stage_here,
    set_experiment,
    stage_process,
    tiny_cfg,
    tiny_params,
)

pytestmark = pytest.mark.usefixtures("isolated_torch")


def test_fault_injector_kills_only_when_told(tmp_path: Path, faults_dir: Path) -> None:
    (tmp_path / "a").touch()

    def renames(**settings: str) -> subprocess.CompletedProcess:
        script = 'import os; os.rename("a", "b"); os.rename("b", "a"); print("done")'
        env = {**os.environ, "PYTHONPATH": str(faults_dir), **settings}
        return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=False)

    assert renames().stdout == "done\n"
    killed = renames(SDN_TEST_KILL_AT="os.rename|b|2")  # the second rename naming b
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
    assert (tmp_path / "b").exists()  # killed before that rename happened


# ---------------------------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize("size", [1, 7, 21, 126, 127])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("limit", [None, 5, 16])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_shard_sampler_visits_every_image_exactly_once(
    size: int, world: int, limit: int | None, batch_size: int
) -> None:
    count = size if limit is None else min(size, limit)
    samplers = [ShardSampler(size, rank, world, limit, batch_size) for rank in range(world)]
    visited = sorted(i for sampler in samplers for i in sampler)
    assert visited == list(range(count))  # no padding duplicates, nothing left out
    assert [len(sampler) for sampler in samplers] == [len(list(sampler)) for sampler in samplers]
    # each process's loader batches are batches of one process: the same images, hence the same noise
    def batches(*shards: ShardSampler) -> list[list[int]]:
        loaders = [DataLoader(range(size), batch_size, sampler=shard) for shard in shards]
        return sorted(batch.tolist() for loader in loaders for batch in loader)

    assert batches(*samplers) == batches(ShardSampler(size, limit=limit))
    assert max(map(len, samplers)) - min(map(len, samplers)) <= batch_size


def global_batches(size: int, batch: int, steps: int, world: int = 1, accumulate: int = 1,
                   start: int = 0) -> list[list[int]]:
    """The images of each optimizer step, gathered over ranks and accumulated micro-batches."""
    samplers = [
        StepBatchSampler(size, batch, seed=3, total=steps * accumulate, rank=rank, world=world,
                         accumulate=accumulate)
        for rank in range(world)
    ]
    for sampler in samplers:
        sampler.start = start * accumulate
    per_rank = [list(sampler) for sampler in samplers]
    assert all(len(batches) == (steps - start) * accumulate for batches in per_rank)
    steps_out = []
    for step in range(steps - start):
        micro = range(step * accumulate, (step + 1) * accumulate)
        # rank r's j-th micro-batch is micro-batch j * world + r of one accumulating process
        steps_out.append([i for j in micro for r in range(world) for i in per_rank[r][j]])
    return steps_out


@pytest.mark.parametrize("size", [101, 96])
def test_step_batches_are_the_same_on_ranks_with_accumulation_and_in_one_batch(size: int) -> None:
    steps = 30  # several epochs: 101 images hold 12 global batches of 8, then 5 left over
    one_batch = global_batches(size, 8, steps)
    assert global_batches(size, 4, steps, world=2) == one_batch
    assert global_batches(size, 4, steps, accumulate=2) == one_batch
    assert global_batches(size, 2, steps, world=2, accumulate=2) == one_batch
    assert global_batches(size, 4, steps, world=2, start=11) == one_batch[11:]  # resumed mid-epoch
    for step in one_batch:
        assert len(set(step)) == 8  # no image twice within a step
    per_epoch = size // 8
    epoch = sorted(i for step in one_batch[:per_epoch] for i in step)
    assert len(set(epoch)) == len(epoch)  # no image twice within an epoch
    assert one_batch[per_epoch] != one_batch[0]  # the next epoch is reshuffled


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adamax(self.parameters(), lr=0.01)  # as VAEModule


def fit_regression(batch_size: int, accumulate: int, steps: int) -> dict[str, torch.Tensor]:
    data = torch.randn(96, 7, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    module = Regression()
    sampler = StepBatchSampler(96, batch_size, seed=5, total=steps * accumulate, accumulate=accumulate)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    loader = DataLoader(TensorDataset(data[:, :6], data[:, 6:]), batch_sampler=sampler)
    trainer.fit(module, loader)
    assert trainer.global_step == steps
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_accumulation_equals_a_k_times_larger_batch() -> None:
    steps = 10  # crosses an epoch: 96 images hold 8 batches of 12
    accumulated = fit_regression(batch_size=4, accumulate=3, steps=steps)
    large = fit_regression(batch_size=12, accumulate=1, steps=steps)
    small = fit_regression(batch_size=4, accumulate=1, steps=steps)
    torch.manual_seed(0)
    start = Regression().state_dict()
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(large[name], start[name], atol=1e-3)  # training moved it
    assert any(not torch.allclose(small[n], large[n], atol=1e-4) for n in large)  # the batch matters


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize(
    ("ckpt_every", "resumed_at"),
    [(2, 4), (3, 3)],  # validation every 3 steps: the checkpoint of a validation step waits for it
    ids=["checkpoint-after-step", "checkpoint-after-validation"],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(
    tmp_path: Path, accumulate: int, ckpt_every: int, resumed_at: int, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_cfg(
        max_steps=6, ckpt_every_steps=ckpt_every, val_every_steps=3, accumulate_grad_batches=accumulate
    )
    reference = Workdir(tmp_path / "reference")
    reference.train(cfg)
    crashed = Workdir(tmp_path / "crashed")
    with pytest.raises(SimulatedCrash, match="simulated crash at step 5"):
        crashed.train(cfg, [CrashAt(5)])
    assert load_checkpoint(crashed.ckpt / LAST_CHECKPOINT)["global_step"] == resumed_at
    # the curves so far were written as the run went: every logged step before the crash, once
    assert pd.read_csv(crashed.metrics / "train.csv")["step"].tolist() == [1, 2, 3, 4]
    assert pd.read_csv(crashed.metrics / "val.csv")["step"].tolist() == [3]
    capsys.readouterr()

    resuming = f"resuming {EXPERIMENT} from {crashed.ckpt / LAST_CHECKPOINT} at step {resumed_at}"
    with pytest.raises(SimulatedCrash, match="simulated crash at step 6"):
        crashed.train(cfg, [CrashAt(6)])  # lost again, before the next checkpoint
    assert resuming in capsys.readouterr().out
    crashed.train(cfg)
    assert resuming in capsys.readouterr().out
    got = load_checkpoint(crashed.ckpt / LAST_CHECKPOINT)
    want = load_checkpoint(reference.ckpt / LAST_CHECKPOINT)
    assert got["global_step"] == want["global_step"] == 6
    assert_same_weights(got["state_dict"], want["state_dict"])
    for curve in ("train.csv", "val.csv"):
        assert (crashed.metrics / curve).read_text() == (reference.metrics / curve).read_text()
    assert len(pd.read_csv(crashed.metrics / "train.csv")) == 6
    assert crashed.evaluate(cfg) == reference.evaluate(cfg)


def test_checkpoint_of_another_configuration_is_set_aside(
    workdir: Workdir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tiny_cfg(max_steps=2)
    workdir.train(old)
    new = tiny_cfg(max_steps=4, lr=0.004)
    old_fingerprint, new_fingerprint = config_fingerprint(old), config_fingerprint(new)
    assert old_fingerprint != new_fingerprint
    with pytest.raises(CheckpointError, match=r"different configuration.*dvc repro train@photos32-cnn"):
        load_ema_model(new, workdir.ckpt / LAST_CHECKPOINT)  # evaluate and sample refuse it too
    capsys.readouterr()

    workdir.train(new)
    out = capsys.readouterr().out
    stale = workdir.stale / f"{EXPERIMENT}-{old_fingerprint}.ckpt"
    assert f"was made with a different configuration ({old_fingerprint} != {new_fingerprint})" in out
    assert f"moved it to {stale}" in out and "resuming" not in out
    assert load_checkpoint(stale)["sdn_fingerprint"] == old_fingerprint
    # not resumed: the weights of a run from scratch with the new configuration
    scratch = Workdir(tmp_path / "scratch")
    scratch.train(new)
    got = load_checkpoint(workdir.ckpt / LAST_CHECKPOINT)
    assert got["sdn_fingerprint"] == new_fingerprint
    assert_same_weights(got["state_dict"], load_checkpoint(scratch.ckpt / LAST_CHECKPOINT)["state_dict"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_is_set_aside_not_resumed(
    workdir: Workdir, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_cfg(max_steps=2)
    workdir.train(cfg)
    path = workdir.ckpt / LAST_CHECKPOINT
    data = path.read_bytes()
    garbage = np.random.default_rng(0).bytes(len(data))
    damaged = {"truncated": data[: len(data) // 2], "garbage": garbage, "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"cannot be read .*dvc repro train@photos32-cnn"):
        load_ema_model(cfg, path)
    capsys.readouterr()

    workdir.train(tiny_cfg(max_steps=4))
    out = capsys.readouterr().out
    stale = workdir.stale / f"{EXPERIMENT}-unreadable.ckpt"
    assert f"{path} cannot be read" in out and f"moved it to {stale}" in out and "resuming" not in out
    assert stale.read_bytes() == damaged
    assert load_checkpoint(path)["global_step"] == 4


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "ckpt" / LAST_CHECKPOINT
    io.save_checkpoint({"global_step": 2, "weights": torch.ones(1000)}, path)
    save = torch.save

    def half_then_full(obj, target, *args, **kwargs) -> None:
        save(obj, target, *args, **kwargs)
        Path(target).write_bytes(Path(target).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    named = r"^disk full while writing the checkpoint .*previous checkpoint is kept"
    with pytest.raises(CheckpointError, match=named):
        io.save_checkpoint({"global_step": 4, "weights": torch.zeros(1000)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [LAST_CHECKPOINT]  # no half file anywhere
    assert load_checkpoint(path)["global_step"] == 2


def test_kill_while_publishing_a_checkpoint_leaves_the_previous_one(
    faults_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    cfg = tiny_cfg(max_steps=6, ckpt_every_steps=2)
    # killed when the second checkpoint (step 4) is written in full but not yet renamed
    env = faulty_env(project, faults_dir, SDN_TEST_KILL_AT="os.rename|.last.ckpt.tmp|2")
    done = stage_process(project, "train", EXPERIMENT, env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (workdir.ckpt / f".{LAST_CHECKPOINT}.tmp").exists()
    assert load_checkpoint(workdir.ckpt / LAST_CHECKPOINT)["global_step"] == 2
    capsys.readouterr()

    workdir.train(cfg)
    assert "at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in workdir.ckpt.iterdir()) == [LAST_CHECKPOINT]
    assert load_checkpoint(workdir.ckpt / LAST_CHECKPOINT)["global_step"] == 6


def test_checkpoints_are_written_without_validation(workdir: Workdir) -> None:
    # checkpoints at validation steps wait for the validation: none must mean no waiting
    cfg = tiny_cfg(max_steps=6, ckpt_every_steps=2, val_every_steps=2, val_batches=0)
    with pytest.raises(SimulatedCrash):
        workdir.train(cfg, [CrashAt(5)])
    assert load_checkpoint(workdir.ckpt / LAST_CHECKPOINT)["global_step"] == 4


def test_resumable_checkpoint_without_one_starts_from_scratch(tmp_path: Path) -> None:
    assert resumable_checkpoint(tmp_path / "none", "0" * 16, tmp_path / "stale") is None
    assert not (tmp_path / "stale").exists()


# ---------------------------------------------------------------------------------------------
# Non-finite loss


def test_nan_weights_stop_training_and_keep_the_last_good_checkpoint(workdir: Workdir) -> None:
    cfg = tiny_cfg(max_steps=8, ckpt_every_steps=2)
    # step 4's loss is finite but its update is NaN: the checkpoint of step 4 must not replace step 2's
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights .* after step 4 .*last good"):
        workdir.train(cfg, [PoisonGradients(4)])
    checkpoint = load_checkpoint(workdir.ckpt / LAST_CHECKPOINT)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    model = load_ema_model(cfg, workdir.ckpt / LAST_CHECKPOINT)
    images = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.isfinite(model(model.obs.preprocess(images))["loss"]).all()
    # the curves show how far the run got: its finite losses, up to the step whose update was NaN
    curve = pd.read_csv(workdir.metrics / "train.csv")
    assert curve["step"].tolist() == [1, 2, 3, 4] and curve["loss_bpd"].notna().all()


def test_exploding_loss_stops_the_train_stage_with_a_message(
    workdir: Workdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir.write_params(tiny_params(lr=1e6))
    message = run_stage_here(workdir.root, "train", EXPERIMENT, monkeypatch)
    assert message.startswith(f"error: non-finite loss (nan) at step 1 of {EXPERIMENT}. Training stopped")
    assert "Lower train.lr" in message
    assert not workdir.ckpt.exists()  # nothing good to keep yet
    # the curve shows how far it got: the one finite step logged before the loss blew up
    assert pd.read_csv(workdir.metrics / "train.csv")["step"].tolist() == [1]


# ---------------------------------------------------------------------------------------------
# Bad parameters, data and sizes


@pytest.mark.parametrize(
    ("script", "edit", "message"),
    [
        ("train", ("experiments", EXPERIMENT, "train", "ema_coeff", 0.9),
         f"error: experiments.{EXPERIMENT}.train.ema_coeff: unknown key. Did you mean 'ema_coef'?"),
        ("train", ("experiments", EXPERIMENT, "train", "batch_size", "32"),
         f"error: experiments.{EXPERIMENT}.train.batch_size: expected int, got str '32'."),
        ("evaluate", ("trainer", "devcies", 2),
         "error: trainer.devcies: unknown key. Did you mean 'devices'?"),
    ],
    ids=["misspelt", "mistyped", "misspelt-trainer"],
)
def test_bad_parameter_stops_the_stage_before_any_work(
    tmp_path: Path, script: str, edit: tuple, message: str
) -> None:
    project = Project(tmp_path)  # no data at all: the parameters must be checked before the data
    params = project.read_params()
    own_experiment(params)
    *where, key, value = edit
    section = params
    for name in where:
        section = section.setdefault(name, {})
    section[key] = value
    project.write_params(params)
    done = stage_process(project, script, EXPERIMENT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in done.stderr
    assert outputs(project) == []


@pytest.mark.parametrize("damage", ["garbage", "garbage-after-header"])
def test_corrupt_lmdb_gives_a_clear_message(workdir: Workdir, damage: str) -> None:
    data_file = workdir.lmdb / "train" / "data.mdb"
    data = data_file.read_bytes()
    if damage == "garbage":
        data_file.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # both meta pages intact, every page of the tree zeroed
        data_file.write_bytes(data[: 2 * 4096] + bytes(len(data) - 2 * 4096))
    with pytest.raises(DatasetError, match=r"(not a readable LMDB|corrupt).*dvc repro convert@photos32"):
        workdir.train(tiny_cfg())
    assert not workdir.ckpt.exists() and not workdir.metrics.exists()


def test_truncated_lmdb_gives_a_clear_message_not_a_crash(tmp_path: Path) -> None:
    # Reading past the end of a truncated LMDB file is a SIGBUS: run the stages as subprocesses.
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    cfg = tiny_cfg(max_steps=2)
    workdir.train(cfg)
    before = outputs(project)
    for split, script in (("train", "train"), ("val", "evaluate")):
        data_file = workdir.lmdb / split / "data.mdb"
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
        done = stage_process(project, script, EXPERIMENT)
        assert done.returncode == 1, f"{script}: exit {done.returncode}\n{done.stderr[-2000:]}"
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: data/lmdb/photos32/{split}/data.mdb is truncated ("), last
        assert last.endswith("rebuild it with `dvc repro convert@photos32`."), last
    assert outputs(project) == before  # no eval.json, the checkpoint untouched


def test_images_of_the_wrong_size_name_both_shapes(
    workdir: Workdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params()
    params["datasets"]["photos32"]["image_size"] = 16  # converted at 8
    workdir.write_params(params)
    message = run_stage_here(workdir.root, "train", EXPERIMENT, monkeypatch)
    assert message == (
        f"error: photos32/train holds images of shape (3, 8, 8) but experiments.{EXPERIMENT} expects "
        "(3, 16, 16) (from datasets.photos32.image_size/channels): fix params.yaml or re-run "
        "dvc repro convert@photos32."
    )
    assert not workdir.ckpt.exists() and not workdir.metrics.exists()


def test_missing_dataset_or_checkpoint_names_the_stage_to_run(
    workdir: Workdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = run_stage_here(workdir.root, "evaluate", EXPERIMENT, monkeypatch)
    assert message == (
        f"error: data/checkpoints/{EXPERIMENT}/last.ckpt not found: train the experiment first "
        f"(dvc repro train@{EXPERIMENT})."
    )
    shutil.rmtree(workdir.lmdb)
    message = run_stage_here(workdir.root, "train", EXPERIMENT, monkeypatch)
    assert message == (
        "error: data/lmdb/photos32/train not found: convert the dataset first (dvc repro convert@photos32)."
    )
    assert not workdir.ckpt.exists() and not workdir.metrics.exists()


# ---------------------------------------------------------------------------------------------
# Interrupted writes: conversion, curves, metrics


@pytest.fixture
def photos_project(tmp_path: Path) -> Project:
    project = Project(tmp_path / "project")
    micro_photos(project)
    return project


def test_killed_conversion_leaves_no_dataset_that_looks_complete(
    photos_project: Project, faults_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lmdb_root = photos_project.root / "data" / "lmdb"
    before = read_metadata(lmdb_root / "photos32" / "val")
    # killed at the rename that would publish the converted dataset, every split written in full
    env = faulty_env(photos_project, faults_dir, SDN_TEST_KILL_AT="os.rename|.photos32.|1")
    done = stage_process(photos_project, "convert", "photos32", env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = [p.name for p in lmdb_root.iterdir() if p.name != "photos32"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".photos32.") and leftovers[0].endswith(".tmp")
    assert read_metadata(lmdb_root / "photos32" / "val") == before  # the previous dataset, intact

    shutil.rmtree(lmdb_root / "photos32")  # now without a previous dataset
    done = stage_process(photos_project, "convert", "photos32", env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (lmdb_root / "photos32").exists()
    message = run_stage_here(photos_project.root, "train", EXPERIMENT, monkeypatch)
    assert "convert the dataset first (dvc repro convert@photos32)" in message

    assert run_stage_here(photos_project.root, "convert", "photos32", monkeypatch) == ""
    assert [p.name for p in lmdb_root.iterdir()] == ["photos32"]  # the rerun cleared the leftovers
    assert read_metadata(lmdb_root / "photos32" / "val") == before


def test_full_disk_during_conversion_leaves_the_previous_dataset(
    photos_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdn.data.lmdb_store as lmdb_store

    lmdb_root = photos_project.root / "data" / "lmdb"
    before = read_metadata(lmdb_root / "photos32" / "train")
    put = lmdb_store._put_growing
    calls = []

    def fill_up(env, items) -> None:
        calls.append(len(items))
        if len(calls) == 2:  # the train split's records are in, its metadata is not
            raise OSError(errno.ENOSPC, "No space left on device")
        put(env, items)

    monkeypatch.setattr(lmdb_store, "_put_growing", fill_up)
    cfg = photos_project.read_params()["datasets"]["photos32"]
    named = r"^disk full while writing .*lmdb/photos32/train: .*convert@photos32"
    with pytest.raises(DataError, match=named):
        convert_dataset("photos32", cfg, photos_project.root / "data" / "raw", lmdb_root)
    assert [p.name for p in lmdb_root.iterdir()] == ["photos32"]  # no temporary folder left
    assert read_metadata(lmdb_root / "photos32" / "train") == before


def test_full_disk_while_writing_curves_or_metrics_keeps_the_previous_files(
    workdir: Workdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(max_steps=2)
    workdir.train(cfg)
    workdir.evaluate(cfg)
    before = {p.name: p.read_bytes() for p in workdir.metrics.iterdir()}
    assert sorted(before) == ["eval.json", "live.json", "train.csv", "val.csv"]
    json.loads(before["eval.json"])

    def half_then_full(self: Path, data: str, *args, **kwargs) -> int:
        with open(self, "w") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    to_csv = pd.DataFrame.to_csv

    def csv_half_then_full(frame: pd.DataFrame, path, *args, **kwargs):
        to_csv(frame.iloc[: len(frame) // 2], path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, pytest.raises(OSError, match="No space left"):
        patched.setattr(Path, "write_text", half_then_full)
        workdir.evaluate(cfg)
    with monkeypatch.context() as patched, pytest.raises(OSError, match="No space left"):
        patched.setattr(pd.DataFrame, "to_csv", csv_half_then_full)
        workdir.train(tiny_cfg(max_steps=4))
    assert {p.name: p.read_bytes() for p in workdir.metrics.iterdir()} == before  # no half file either


# ---------------------------------------------------------------------------------------------
# Slow: SIGKILL and `dvc repro`, DDP on two processes, a killed evaluation


def final_state(project: Project) -> dict[str, Any]:
    root = project.root
    return {
        "weights": last_checkpoint(root)["state_dict"],
        "eval": (root / "metrics" / EXPERIMENT / "eval.json").read_text(),
        "train": (root / "metrics" / EXPERIMENT / "train.csv").read_text(),
        "val": (root / "metrics" / EXPERIMENT / "val.csv").read_text(),
    }


def remove_outputs(project: Project) -> None:
    shutil.rmtree(project.root / "data" / "checkpoints" / EXPERIMENT)
    shutil.rmtree(project.root / "metrics" / EXPERIMENT)


@pytest.mark.slow
def test_sigkill_during_training_then_dvc_repro_resumes_to_the_same_result(photos_project: Project) -> None:
    project = photos_project
    project.dvc("repro", "convert@photos32")  # recorded in dvc.lock (same data)
    set_experiment(project, "train", batch_size=8, max_steps=150, ckpt_every_steps=5, val_every_steps=10)
    set_experiment(project, "trainer", log_every_n_steps=5)
    project.stage("train", EXPERIMENT)
    project.stage("evaluate", EXPERIMENT)
    reference = final_state(project)
    remove_outputs(project)

    ckpt = project.root / "data" / "checkpoints" / EXPERIMENT / LAST_CHECKPOINT
    process = subprocess.Popen(
        [sys.executable, "stages/train.py", EXPERIMENT], cwd=project.root, env=project.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    killed_at = load_checkpoint(ckpt)["global_step"]  # always a complete file under the final name
    assert 0 < killed_at < 150

    done = project.dvc("repro", f"evaluate@{EXPERIMENT}")
    resumed = [line for line in done.stdout.splitlines() if "resuming" in line]
    assert len(resumed) == 1, done.stdout[-3000:]
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert resumed[0] == f"[sdn] resuming {EXPERIMENT} from {ckpt.relative_to(project.root)} at step {step}"
    assert killed_at <= step < 150
    result = final_state(project)
    assert_same_weights(result["weights"], reference["weights"])
    for name in ("eval", "train", "val"):
        assert result[name] == reference[name], name

    # a checkpoint of another configuration is set aside, not resumed
    old = load_checkpoint(ckpt)["sdn_fingerprint"]
    set_experiment(project, "train", lr=0.004, max_steps=10)
    done = project.dvc("repro", f"train@{EXPERIMENT}")
    stale = f"data/stale-checkpoints/{EXPERIMENT}-{old}.ckpt"
    assert f"was made with a different configuration ({old} != " in done.stdout
    assert f"moved it to {stale} and training starts from scratch" in done.stdout
    assert "resuming" not in done.stdout
    assert load_checkpoint(project.root / stale)["global_step"] == 150
    assert load_checkpoint(ckpt)["global_step"] == 10 and load_checkpoint(ckpt)["sdn_fingerprint"] != old


# One configuration for both machines: 2 devices asked. With SDN_CPU_DEVICES=2 the CPU counts as 2
# devices and the run is 2 DDP processes (gloo); without, it counts as one, and the fit runs 1
# process accumulating 2 micro-batches per step (sdn/training/machine.py).
DDP_MACHINE, ONE_PROCESS = "2", "1"


def two_device_run(project: Project, **train: Any) -> None:
    set_experiment(project, "train", **{"batch_size": 4, "max_steps": 6, "val_every_steps": 3,
                                        "val_batches": 3, **train})
    set_experiment(project, "evaluate", batch_size=10)  # validation: 3 batches of 10, 15 per process
    set_experiment(project, "trainer", accelerator="cpu", devices=2, strategy="ddp")


def run_result(project: Project, done: subprocess.CompletedProcess) -> dict[str, Any]:
    root = project.root
    return {
        "weights": last_checkpoint(root)["state_dict"],
        "train": pd.read_csv(root / "metrics" / EXPERIMENT / "train.csv"),
        "val": pd.read_csv(root / "metrics" / EXPERIMENT / "val.csv"),
        "stdout": done.stdout,
        "stderr": done.stderr,
    }


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Weights and curves agree to float tolerance: the sums of a global batch are taken in
    another order (a different batch split, one batch of 8, differs by ~2e-2)."""
    assert_same_weights(got["weights"], want["weights"], rtol=1e-4, atol=1e-4)
    for curve in ("train", "val"):
        assert got[curve]["step"].tolist() == want[curve]["step"].tolist()
    for column in ("loss_bpd", "neg_elbo_bpd", "kl_bpd", "lr"):  # every step's, over its global batch
        np.testing.assert_allclose(got["train"][column], want["train"][column], rtol=1e-5, err_msg=column)
    for column in ("neg_elbo_bpd", "kl_bpd", "images"):  # same images, batches and noise
        np.testing.assert_allclose(got["val"][column], want["val"][column], rtol=1e-5, err_msg=column)


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_fitted_to_the_machine(
    photos_project: Project, faults_dir: Path, tmp_path: Path
) -> None:
    project = photos_project
    val_images = read_metadata(project.root / "data" / "lmdb" / "photos32" / "val").count
    two_device_run(project)
    runs, writes = {}, {}
    for name, cpu_devices in (("ddp", DDP_MACHINE), ("one", ONE_PROCESS)):
        log = tmp_path / f"{name}-writes.log"
        env = faulty_env(project, faults_dir, SDN_TEST_WRITE_LOG=str(log), SDN_TEST_WATCH=str(project.root),
                         SDN_CPU_DEVICES=cpu_devices)
        done = stage_process(project, "train", EXPERIMENT, env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = run_result(project, done)
        writes[name] = [line.split("\t") for line in log.read_text().splitlines()]
        remove_outputs(project)
    assert leftover_processes(project) == []

    ddp, one = runs["ddp"], runs["one"]
    assert "distributed_backend=gloo" in ddp["stderr"] and "Starting with 2 processes" in ddp["stderr"]
    assert "Starting with" not in one["stderr"]
    fitted = (f"[sdn] {EXPERIMENT}: 2 devices asked, accelerator cpu (one device): 2 micro-batches of 4 "
              "per step (global batch 8, as configured)")
    assert fitted in one["stdout"].splitlines() and "devices asked" not in ddp["stdout"]
    assert_same_run(ddp, one)
    for run in (ddp, one):
        assert run["val"]["step"].tolist() == [3, 6]
        assert run["val"]["images"].tolist() == [min(30, val_images)] * 2  # each image once, no padding
        assert run["train"]["step"].tolist() == list(range(1, 7))
    # the process that started the DDP run and both ranks were watched: only rank 0 wrote
    assert sorted(rank for rank, event, _ in writes["ddp"] if event == "start") == ["0", "1", "main"]
    writers = {rank for rank, event, _ in writes["ddp"] if event != "start"}
    assert writers == {"0"}, [w for w in writes["ddp"] if w[0] != "0"]
    written = {Path(path).name for _, event, path in writes["ddp"] if event == "os.rename"}
    assert {"train.csv", "val.csv", LAST_CHECKPOINT} <= written


@pytest.mark.slow
def test_a_run_that_switches_between_ddp_and_one_process_at_a_checkpoint_agrees(
    photos_project: Project, faults_dir: Path
) -> None:
    project = photos_project
    two_device_run(project, ckpt_every_steps=3)
    done = stage_process(project, "train", EXPERIMENT, faulty_env(project, faults_dir, SDN_CPU_DEVICES="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = run_result(project, done)
    remove_outputs(project)

    ckpt = project.root / "data" / "checkpoints" / EXPERIMENT / LAST_CHECKPOINT
    for first, then in ((DDP_MACHINE, ONE_PROCESS), (ONE_PROCESS, DDP_MACHINE)):
        # killed when the checkpoint of step 6 is written in full, before it is published: a crash
        # in one process (rank 0, which writes) with the checkpoint of step 3 kept
        env = faulty_env(project, faults_dir, SDN_CPU_DEVICES=first,
                         SDN_TEST_KILL_AT=f"os.rename|.{LAST_CHECKPOINT}.tmp|2")
        killed = stage_process(project, "train", EXPERIMENT, env)
        if first == DDP_MACHINE:  # every rank stopped with it, one error line
            assert killed.returncode == 1, killed.stderr[-3000:]
            errors = [line for line in killed.stderr.splitlines() if line.startswith("error:")]
            assert errors == [killed.stderr.strip().splitlines()[-1]] == [
                "error: training process rank 0 of 2 was killed (SIGKILL, perhaps out of memory); all 2 "
                "training processes were stopped. The last checkpoint is kept: rerun the same command to "
                "resume from it."
            ]
        else:
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert leftover_processes(project) == []
        assert load_checkpoint(ckpt)["global_step"] == 3

        env = faulty_env(project, faults_dir, SDN_CPU_DEVICES=then)
        done = stage_process(project, "train", EXPERIMENT, env)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = f"[sdn] resuming {EXPERIMENT} from {ckpt.relative_to(project.root)} at step 3"
        assert done.stdout.splitlines().count(resumed) == 1  # once, not once per rank
        assert_same_run(run_result(project, done), uninterrupted)
        remove_outputs(project)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_a_rank_that_dies_mid_run_takes_every_process_with_it(
    photos_project: Project, faults_dir: Path
) -> None:
    # Lightning's own launcher made rank 0 the parent: rank 1 dying left it waiting in a collective
    project = photos_project
    two_device_run(project, max_steps=400, ckpt_every_steps=2, val_every_steps=200)
    set_experiment(project, "trainer", num_workers=1)  # loader workers must go with their ranks
    ckpt = project.root / "data" / "checkpoints" / EXPERIMENT / LAST_CHECKPOINT
    env = faulty_env(project, faults_dir, SDN_CPU_DEVICES=DDP_MACHINE)
    process = subprocess.Popen([sys.executable, "stages/train.py", EXPERIMENT], cwd=project.root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists():  # training, past its first steps
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        rank_1_and_worker = leftover_processes(project, local_rank="1")
        rank_1 = [pid for pid in rank_1_and_worker if parent_of(pid) not in rank_1_and_worker]
        assert len(rank_1_and_worker) == 2 and len(rank_1) == 1, rank_1_and_worker
        os.kill(rank_1[0], signal.SIGKILL)
        killed = time.monotonic()
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert time.monotonic() - killed < 30  # stopped at once, not at gloo's timeout
    assert process.returncode == 1
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] == [
        "error: training process rank 1 of 2 was killed (SIGKILL, perhaps out of memory); all 2 training "
        "processes were stopped. The last checkpoint is kept: rerun the same command to resume from it."
    ]
    assert leftover_processes(project) == []
    assert 0 < load_checkpoint(ckpt)["global_step"] < 400


@pytest.mark.slow
def test_a_known_failure_under_ddp_ends_with_one_error_line_and_no_process(
    photos_project: Project, faults_dir: Path
) -> None:
    project = photos_project
    two_device_run(project, lr=1e6)
    set_experiment(project, "trainer", num_workers=1)
    env = faulty_env(project, faults_dir, SDN_CPU_DEVICES=DDP_MACHINE)
    done = stage_process(project, "train", EXPERIMENT, env)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith(f"error: non-finite loss (nan) at step 1 of {EXPERIMENT}. Training stopped")
    assert lines[-1].endswith("(rank 0 of 2; all 2 training processes were stopped)")
    assert leftover_processes(project) == []
    assert not (project.root / "data" / "checkpoints" / EXPERIMENT).exists()


@pytest.mark.slow
def test_killed_evaluation_leaves_the_previous_metrics(tmp_path: Path, faults_dir: Path) -> None:
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    workdir.train(tiny_cfg(max_steps=2))
    eval_json = workdir.metrics / "eval.json"
    # killed when eval.json is written in full under its temporary name, before the rename
    env = faulty_env(project, faults_dir, SDN_TEST_KILL_AT="os.rename|.eval.json.tmp|1")
    done = stage_process(project, "evaluate", EXPERIMENT, env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not eval_json.exists()

    assert project.stage("evaluate", EXPERIMENT).returncode == 0
    previous = eval_json.read_text()
    json.loads(previous)
    done = stage_process(project, "evaluate", EXPERIMENT, env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert eval_json.read_text() == previous


@pytest.mark.slow
def test_killed_evaluation_midway_writes_nothing(tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    workdir = Workdir(project.root)
    workdir.train(tiny_cfg(max_steps=2))
    params = tiny_params(max_steps=2)
    section_of(params, EXPERIMENT, "evaluate").update(iw_samples=4096, batch_size=1, chunk_size=64)
    workdir.write_params(params)
    process = subprocess.Popen(
        [sys.executable, "stages/evaluate.py", EXPERIMENT], cwd=project.root, env=project.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    maps = Path(f"/proc/{process.pid}/maps")
    try:
        deadline = time.monotonic() + 300
        # the validation split is mapped once the checkpoint is loaded and evaluation begins
        while "photos32/val/data.mdb" not in maps.read_text():
            assert process.poll() is None, "evaluation ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)
        assert process.poll() is None, "evaluation ended before it was killed"
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    # only what training wrote: the killed evaluation left no eval.json
    assert sorted(p.name for p in workdir.metrics.iterdir()) == ["live.json", "train.csv", "val.csv"]
