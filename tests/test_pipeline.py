"""End to end: the DVC pipeline on micro experiments, in a throw-away copy of the project.

One module-wide build runs a bare `dvc repro` once (three to four minutes here); the tests read it,
and those that change things (a parameter, a git commit) work on a copy or a clone of it. The
determinism tests build a second copy from scratch and are marked slow (`make test-slow`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tests.pipeline_project import REPO, Project

DEFAULT_DATASETS = ("photos32", "sprites")
DEFAULT_EXPERIMENTS = ("photos32-sdn", "photos32-cnn", "sprites-sdn", "sprites-cnn")
DEFAULT_STAGES = (
    *(f"{stage}@{dataset}" for dataset in DEFAULT_DATASETS for stage in ("download", "convert")),
    *(f"{stage}@{name}" for name in DEFAULT_EXPERIMENTS for stage in ("train", "evaluate", "sample")),
    "summary",
    "comparison",
)
DISENTANGLEMENT_SCORES = (
    "beta_vae",
    "factor_vae",
    "mig",
    "dci_disentanglement",
    "dci_completeness",
    "dci_informativeness",
)
CHANGED = "photos32-cnn"  # the experiment whose learning rate the change tests edit (its stages are quick)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# `make test` runs these under make: --no-print-directory keeps the nested make from adding
# "Entering/Leaving directory" lines to the output the tests read.
MAKE = ("make", "--no-print-directory")


class ProjectAt(Project):
    """An existing project directory (a copy or a git clone of a built one), driven like a Project:
    its `env` puts this directory's `sdn` on PYTHONPATH."""

    def __init__(self, root: Path) -> None:  # adopt the directory as it is: no copy, no git init
        self.root = root


@dataclass
class Build:
    project: Project
    repro_output: str  # stdout and stderr of its `dvc repro`
    source: str  # the commit it was built from: micro params, no results


@dataclass
class Change:
    project: ProjectAt
    status_before: dict[str, Any]  # `dvc status --json` of the default pipeline after the edit
    repro_output: str
    untouched_before: dict[str, tuple[str, int]]  # snapshot of what the edit must not touch
    untouched_after: dict[str, tuple[str, int]]


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def stages_run(repro_output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", repro_output)


def commit(project: Project, message: str) -> None:
    project.git("add", "-A")
    project.git("-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", message)


def files_under(root: Path, paths: list[str]) -> list[Path]:
    """Every file under `paths` (files or folders relative to `root`), relative to `root`."""
    files = []
    for path in paths:
        top = root / path
        files += [file.relative_to(root) for file in [top, *top.rglob("*")] if file.is_file()]
    return sorted(files)


def digests(root: Path, paths: list[str]) -> dict[str, str]:
    """md5 of every file under `paths`, keyed by its path relative to `root`."""
    return {
        str(file): hashlib.md5((root / file).read_bytes()).hexdigest() for file in files_under(root, paths)
    }


def snapshot(root: Path, paths: list[str]) -> dict[str, tuple[str, int]]:
    """(md5, mtime) of every file under `paths`: equal snapshots mean the files were not rewritten."""
    return {path: (digest, (root / path).stat().st_mtime_ns) for path, digest in digests(root, paths).items()}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"dotted.key": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def eval_metrics(root: Path, experiment: str) -> dict[str, Any]:
    return json.loads((root / "metrics" / experiment / "eval.json").read_text())


def pipeline_status(project: Project) -> dict[str, Any]:
    """A bare `dvc status`: the pipeline holds only the enabled (default) runs."""
    return json.loads(project.dvc("status", "--json").stdout)


def head(project: Project) -> str:
    return project.git("rev-parse", "HEAD").stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The micro pipeline after one bare `dvc repro`, with dvc.lock and metrics/ committed."""
    project = Project(tmp_path_factory.mktemp("built"))
    source = head(project)
    build = Build(project, output_of(project.dvc("repro")), source)
    commit(project, "micro run")
    return build


@pytest.fixture(scope="module")
def changed(built: Build, tmp_path_factory: pytest.TempPathFactory) -> Change:
    """A copy of the built project (cache, data and git history included) after doubling one
    experiment's learning rate and running `dvc repro` again."""
    project = ProjectAt(tmp_path_factory.mktemp("changed") / "project")
    shutil.copytree(built.project.root, project.root, symlinks=True)
    params = project.read_params()
    old_leaves = flatten(params)
    # a training key of its own, over its base's
    lr = params["bases"][params["experiments"][CHANGED]["extends"]]["train"]["lr"]
    params["experiments"][CHANGED]["train"] = {"lr": lr * 2}
    project.write_params(params)
    new_leaves = flatten(project.read_params())
    assert {k for k in old_leaves.keys() | new_leaves.keys() if old_leaves.get(k) != new_leaves.get(k)} == {
        f"experiments.{CHANGED}.train.lr"
    }, "the edit of params.yaml must change exactly one key"

    others = [name for name in DEFAULT_EXPERIMENTS if name != CHANGED]
    untouched = [
        "data/raw",
        "data/lmdb",
        *(f"data/checkpoints/{name}" for name in others),
        *(f"metrics/{name}" for name in others),
    ]
    before = snapshot(project.root, untouched)
    status = pipeline_status(project)
    repro = project.dvc("repro")
    return Change(project, status, output_of(repro), before, snapshot(project.root, untouched))


# ---- make ----------------------------------------------------------------------------------------


def test_make_help_lists_the_targets() -> None:
    result = subprocess.run([*MAKE, "help"], cwd=REPO, capture_output=True, text=True, check=True)
    targets = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"all", "install", "test", "test-slow", "metrics", "diff", "plots", "<dataset>"} <= targets
    for dataset in ("cifar10", "imagenet32", "celebahq256", "3dshapes", *DEFAULT_DATASETS):
        assert dataset in result.stdout


def test_make_dataset_dry_run_reproduces_that_datasets_stages() -> None:
    result = subprocess.run([*MAKE, "-n", "cifar10"], cwd=REPO, capture_output=True, text=True, check=True)
    repros = [line.split() for line in result.stdout.splitlines() if "dvc repro" in line]
    assert repros, result.stdout
    stages = {word for words in repros for word in words if "@" in word}
    expected = {f"{stage}@cifar10-{arch}" for stage in ("evaluate", "sample") for arch in ("sdn", "cnn")}
    assert stages == expected
    assert any("summary" in words and "comparison" in words for words in repros), \
        "make <dataset> also refreshes the summary and the comparison picture"
    commands = result.stdout.splitlines()
    download = next(i for i, line in enumerate(commands) if "stages/download.py cifar10" in line)
    enable = next(i for i, line in enumerate(commands) if "-m sdn pipeline enable cifar10" in line)
    assert download < enable, "the registry changes only once the download succeeded"
    assert enable < min(i for i, line in enumerate(commands) if "dvc repro" in line), "enabled before it runs"
    assert "-m sdn readme" in commands[-1], "and the README's table follows the new summary"


def test_make_refreshes_the_readme_after_the_pipeline() -> None:
    # `make` rewrites metrics/summary.md; the README's copy of it must follow, or `make test` fails
    result = subprocess.run([*MAKE, "-n", "all"], cwd=REPO, capture_output=True, text=True, check=True)
    commands = [line for line in result.stdout.splitlines() if "dvc repro" in line or " -m sdn " in line]
    kinds = [("dvc repro" in line, "sdn readme" in line) for line in commands]
    assert kinds == [(True, False), (True, False), (False, True)]
    # the enabled runs less the opt-in ones, then the summary and the picture alone (they read every
    # committed eval.json and val.csv)
    assert "-m sdn pipeline targets" in commands[0]
    assert commands[1].split()[-4:] == ["repro", "--single-item", "summary", "comparison"]
    assert "--force" not in result.stdout
    assert "--force" not in (REPO / "Makefile").read_text()


def test_readme_follows_a_rebuilt_summary(built: Build) -> None:
    from sdn.summary import with_results

    root = built.project.root
    built.project.run(str(Path(sys.executable)), "-m", "sdn", "readme")
    readme = (root / "README.md").read_text()
    assert with_results(readme, (root / "metrics" / "summary.md").read_text()) == readme
    assert "photos32-sdn" in readme
    built.project.git("checkout", "README.md")


# ---- the first `dvc repro summary` -------------------------------------------------------------


def test_first_repro_runs_every_default_stage_once(built: Build) -> None:
    assert Counter(stages_run(built.repro_output)) == Counter(DEFAULT_STAGES)


def test_declared_outputs_exist(built: Build) -> None:
    root = built.project.root
    for dataset in DEFAULT_DATASETS:
        assert any((root / "data" / "raw" / dataset).iterdir()), f"data/raw/{dataset} is empty"
        for split in ("train", "val"):
            assert (root / "data" / "lmdb" / dataset / split / "data.mdb").is_file()
    for name in DEFAULT_EXPERIMENTS:
        assert (root / "data" / "checkpoints" / name / "last.ckpt").stat().st_size > 0
        metrics = root / "metrics" / name
        for curve in ("train.csv", "val.csv"):
            table = pd.read_csv(metrics / curve)
            assert {"step", "neg_elbo_bpd"} <= set(table.columns) and len(table) > 0, f"{name}/{curve}"
        assert (metrics / "eval.json").is_file()
        samples = sorted((metrics / "samples").glob("*.png"))
        assert samples, f"no sample grids for {name}"
        for png in samples:
            assert png.read_bytes()[:8] == PNG_MAGIC, png
    for summary in ("summary.md", "summary.csv"):
        assert (root / "metrics" / summary).stat().st_size > 0


def test_lock_records_every_default_stage_and_its_outputs(built: Build) -> None:
    root = built.project.root
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    params = built.project.read_params()
    for stage in DEFAULT_STAGES:
        assert stage in lock, f"dvc.lock lacks {stage}"
        assert lock[stage]["outs"], f"{stage} recorded no outputs"
        for out in lock[stage]["outs"]:
            assert out.get("md5"), f"{stage}: no hash for {out['path']}"
            assert (root / out["path"]).exists(), f"{stage}: {out['path']} is recorded but missing"
    for name in DEFAULT_EXPERIMENTS:
        train = lock[f"train@{name}"]
        assert train["params"]["params.yaml"][f"experiments.{name}"] == params["experiments"][name]
        assert "sdn/training" in {dep["path"] for dep in train["deps"]}


@pytest.mark.parametrize("experiment", DEFAULT_EXPERIMENTS)
def test_eval_metrics_are_finite_and_consistent(built: Build, experiment: str) -> None:
    metrics = eval_metrics(built.project.root, experiment)
    for key in ("neg_elbo_bpd", "nll_bpd", "kl_bpd"):
        assert math.isfinite(metrics[key]), f"{key} = {metrics[key]}"
    # the importance-weighted bound is never looser than the ELBO it starts from
    assert metrics["nll_bpd"] <= metrics["neg_elbo_bpd"] + 1e-3
    assert metrics["kl_bpd"] >= 0
    if experiment.startswith("sprites-"):
        for score in DISENTANGLEMENT_SCORES:
            assert 0 <= metrics[score] <= 1, f"{score} = {metrics[score]}"


def test_summary_has_one_row_per_default_experiment(built: Build) -> None:
    root = built.project.root
    table = pd.read_csv(root / "metrics" / "summary.csv")
    assert sorted(table["experiment"]) == sorted(DEFAULT_EXPERIMENTS)
    experiments = list(table["experiment"])
    for dataset in DEFAULT_DATASETS:  # each SDN run directly followed by its CNN baseline
        assert experiments.index(f"{dataset}-cnn") == experiments.index(f"{dataset}-sdn") + 1
    for row in table.itertuples():
        assert row.neg_elbo_bpd == pytest.approx(eval_metrics(root, row.experiment)["neg_elbo_bpd"])
    markdown = (root / "metrics" / "summary.md").read_text()
    for name in DEFAULT_EXPERIMENTS:
        assert name in markdown


def test_plots_show_renders_curves_and_sample_grids(built: Build, tmp_path: Path) -> None:
    result = built.project.dvc("plots", "show", "--json", "-o", str(tmp_path / "plots"))
    plots = json.loads(result.stdout)["data"]
    for name in DEFAULT_EXPERIMENTS:
        (plot,) = plots[f"metrics/{name}/train.csv"]
        rows = plot["content"]["data"]["values"]
        assert rows and {"step", "neg_elbo_bpd"} <= set(rows[0]), f"{name}/train.csv"
        grids = [path for path in plots if path.startswith(f"metrics/{name}/samples/")]
        assert grids, f"no sample plots for {name}"
        for path in grids:
            (image,) = plots[path]
            assert image["type"] == "image" and Path(image["url"]).is_file()


def test_plots_show_the_comparison_picture_and_each_runs_validation_curve(
    built: Build, tmp_path: Path
) -> None:
    plots = json.loads(built.project.dvc("plots", "show", "--json", "-o", str(tmp_path)).stdout)["data"]
    (picture,) = plots["metrics/comparison.png"]
    assert picture["type"] == "image" and Path(picture["url"]).is_file()
    for name in DEFAULT_EXPERIMENTS:
        (plot,) = plots[f"metrics/{name}/val.csv"]
        rows = plot["content"]["data"]["values"]
        want = pd.read_csv(built.project.root / "metrics" / name / "val.csv")
        assert [(int(r["step"]), float(r["neg_elbo_bpd"])) for r in rows] == list(
            zip(want["step"], want["neg_elbo_bpd"], strict=True))


def test_plots_show_warns_of_nothing_with_the_imported_run_enabled(built: Build, tmp_path: Path) -> None:
    # as `make celebahq256-release` leaves it: evaluated and sampled, never trained (no curve)
    project = copy_of(built, tmp_path)
    project.run(sys.executable, "-m", "sdn", "pipeline", "enable", "celebahq256-release")
    metrics = project.root / "metrics" / "celebahq256-release"
    (metrics / "samples").mkdir(parents=True)
    shutil.copy(project.root / "metrics" / "photos32-sdn" / "eval.json", metrics / "eval.json")
    for grid in (project.root / "metrics" / "photos32-sdn" / "samples").glob("samples_t*.png"):
        shutil.copy(grid, metrics / "samples" / grid.name)
    shown = project.dvc("plots", "show", "--json", "-o", str(tmp_path / "plots"))
    out = output_of(shown)
    assert "failed to load" not in out and "WARNING" not in out, out[-3000:]
    plots = json.loads(shown.stdout)["data"]
    assert [path for path in plots if path.startswith("metrics/celebahq256-release/samples/")]
    assert not [path for path in plots if path.startswith("metrics/celebahq256-release/") and
                path.endswith(".csv")]


def test_offline_clean_dvc_commands_see_only_the_default_runs(built: Build) -> None:
    """A fresh clone without the paper's data: no paper stage, no warning, in any dvc view."""
    project = built.project
    # the paper's runs stay defined in paper.yaml, of which no stage tracks a key
    outputs = {
        " ".join(args): output_of(project.dvc(*args))
        for args in (("status",), ("repro", "--dry"), ("metrics", "show"), ("plots", "show", "--json"),
                     ("exp", "show", "--no-pager", "--md"), ("params", "diff"))
    }
    assert "Data and pipelines are up to date" in outputs["status"]
    for command, text in outputs.items():
        for word in ("cifar10", "imagenet32", "celebahq256", "3dshapes"):
            assert word not in text, f"`dvc {command}` mentions {word}"
        for warning in ("WARNING", "failed to load", "ERROR"):
            assert warning not in text, f"`dvc {command}`: {text[-2000:]}"
    for name in DEFAULT_EXPERIMENTS:
        assert f"metrics/{name}/eval.json" in outputs["metrics show"]
    live = json.loads((project.root / "metrics" / "photos32-sdn" / "live.json").read_text())
    assert live["step"] == project.read_params()["bases"]["photos32"]["train"]["max_steps"]
    assert "metrics/photos32-sdn/live.json" in outputs["metrics show"]


def test_second_repro_does_nothing(built: Build) -> None:
    lock = (built.project.root / "dvc.lock").read_bytes()
    output = output_of(built.project.dvc("repro"))
    assert stages_run(output) == []
    for stage in DEFAULT_STAGES:
        assert f"Stage '{stage}' didn't change" in output
    assert (built.project.root / "dvc.lock").read_bytes() == lock
    assert pipeline_status(built.project) == {}


# ---- the lock tells the truth -----------------------------------------------------------------


def copy_of(built: Build, where: Path) -> ProjectAt:
    """A copy of the built project: git history, DVC cache, data and results."""
    project = ProjectAt(where / "project")
    shutil.copytree(built.project.root, project.root, symlinks=True)
    return project


def test_exp_show_shows_no_paper_run_and_no_variable_file(built: Build) -> None:
    header = built.project.dvc("exp", "show", "--csv").stdout.splitlines()[0].split(",")
    for word in ("paper.yaml", "cifar10", "imagenet32", "celebahq256", "3dshapes", "pipeline.yaml"):
        assert not [column for column in header if word in column], word
    assert "experiments.photos32-sdn.model.sdn_num_dirs" in header
    assert "bases.photos32.train.lr" in header


@pytest.mark.parametrize(
    ("section", "key", "value", "rerun"),
    [
        ("evaluate", "max_images", 8, ("evaluate",)),
        ("sample", "grid", 1, ("sample",)),
        ("sample", "temperatures", [0.5], ("evaluate", "sample")),  # evaluate reads the first one
    ],
)
def test_an_edit_to_evaluation_or_sampling_reruns_no_training(
    built: Build, tmp_path: Path, section: str, key: str, value: Any, rerun: tuple[str, ...]
) -> None:
    project = copy_of(built, tmp_path)
    params = project.read_params()
    params["bases"]["photos32"][section][key] = value
    project.write_params(params)
    assert set(pipeline_status(project)) == {f"{stage}@photos32-{arch}" for stage in rerun
                                             for arch in ("sdn", "cnn")}


def test_a_code_change_retrains_from_step_zero(built: Build, tmp_path: Path) -> None:
    project = copy_of(built, tmp_path)
    root = project.root
    checkpoint = root / "data" / "checkpoints" / CHANGED / "last.ckpt"
    old = torch_load(checkpoint)
    with (root / "sdn" / "layers.py").open("a") as module:
        module.write("# an edit that changes no result, in a module every training imports\n")
    changed = set(pipeline_status(project))
    assert {f"train@{name}" for name in DEFAULT_EXPERIMENTS} <= changed
    assert not {stage for stage in changed if stage.startswith(("download@", "convert@"))}
    out = output_of(project.dvc("repro", f"train@{CHANGED}"))
    assert "was made by other code" in out and "training starts from scratch" in out, out[-3000:]
    assert "resuming" not in out
    new = torch_load(checkpoint)
    assert new["global_step"] == old["global_step"] and new["sdn_code"] != old["sdn_code"]
    assert new["sdn_fingerprint"] == old["sdn_fingerprint"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][f"train@{CHANGED}"]
    layers = next(dep for dep in lock["deps"] if dep["path"] == "sdn/layers.py")
    assert layers["md5"] == hashlib.md5((root / "sdn" / "layers.py").read_bytes()).hexdigest()


def test_a_finished_run_run_again_trains_nothing_and_keeps_its_checkpoint(
    built: Build, tmp_path: Path
) -> None:
    project = copy_of(built, tmp_path)
    root = project.root
    kept = [root / "data" / "checkpoints" / CHANGED / "last.ckpt", root / "dvc.lock",
            *sorted((root / "metrics" / CHANGED).glob("*.csv")), root / "metrics" / CHANGED / "live.json"]
    before = {path: path.read_bytes() for path in kept}
    out = output_of(project.dvc("repro", "--force", "--single-item", f"train@{CHANGED}"))
    assert f"{CHANGED} finished at step" in out and "nothing to train" in out, out[-3000:]
    assert {path: path.read_bytes() for path in kept} == before
    assert pipeline_status(project) == {}


def test_exp_run_set_param_reruns_that_experiment_only(built: Build, tmp_path: Path) -> None:
    project = copy_of(built, tmp_path)
    out = output_of(project.dvc("exp", "run", "-S", "experiments.photos32-sdn.model.sdn_num_dirs=1"))
    assert sorted(stages_run(out)) == sorted(
        [f"{stage}@photos32-sdn" for stage in ("train", "evaluate", "sample")] + ["summary", "comparison"]
    ), out[-3000:]


EDITED_EVALUATION = """

_evaluate = evaluate_experiment


def evaluate_experiment(*args, **kwargs):  # noqa: F811 - the queued experiment's edit
    print("[edited] this evaluation ran the queued experiment's own code")
    return _evaluate(*args, **kwargs)
"""


def settle_queue(project: ProjectAt, deadline_s: float = 900) -> str:
    """Wait until no queued experiment is queued or running; `dvc queue status` at the end."""
    import time

    end = time.monotonic() + deadline_s
    while True:
        status = output_of(project.dvc("queue", "status"))
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < end, status
        time.sleep(3)


@pytest.mark.slow
def test_queued_experiment_runs_and_records_its_own_code_then_travels(built: Build, tmp_path: Path) -> None:
    project = copy_of(built, tmp_path)
    root = project.root
    env = {key: value for key, value in project.env.items() if key != "PYTHONPATH"}  # as a user runs it
    module = root / "sdn" / "evaluation" / "run.py"
    original = module.read_text()
    module.write_text(original + EDITED_EVALUATION)
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*args: str) -> str:
        done = subprocess.run([dvc, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, output_of(done)[-4000:]
        return output_of(done)

    run("exp", "run", "--queue", "--name", "edited-code")
    module.write_text(original)  # the workspace goes back; the queued experiment keeps its copy
    run("queue", "start")
    status = settle_queue(project)
    assert "Success" in status and "Failed" not in status, status
    logs = run("queue", "logs", "edited-code")
    assert "[edited] this evaluation ran the queued experiment's own code" in logs
    assert {f"evaluate@{name}" for name in DEFAULT_EXPERIMENTS} <= set(stages_run(logs))  # its code changed

    shown = json.loads(run("exp", "show", "--json"))
    experiment = next(exp for exp in shown[-1]["experiments"] if exp["name"] == "edited-code")
    recorded = experiment["revs"][0]["data"]["deps"]["sdn/evaluation"]["hash"]
    assert recorded != shown[-1]["data"]["deps"]["sdn/evaluation"]["hash"]  # not the workspace's code

    # it travels: a bare git remote and a DVC remote; a fresh clone pulls, applies, runs nothing
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    project.git("remote", "add", "origin", str(tmp_path / "origin.git"))
    run("remote", "add", "-d", "storage", str(tmp_path / "storage"))
    commit(project, "DVC remote")
    project.git("push", "-q", "origin", "HEAD:main")
    run("push")
    run("exp", "push", "origin", "edited-code")
    clone = ProjectAt(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", "-b", "main", str(tmp_path / "origin.git"), str(clone.root)],
                   check=True)
    clone.dvc("pull")
    clone.dvc("exp", "pull", "origin", "edited-code")
    clone.dvc("exp", "apply", "edited-code")
    for name in DEFAULT_EXPERIMENTS:
        path = Path("metrics") / name / "eval.json"
        assert json.loads((clone.root / path).read_text()) == json.loads(
            project.git("show", f"{experiment_ref(project, 'edited-code')}:{path}").stdout)
    assert pipeline_status(clone) == {}


def experiment_ref(project: ProjectAt, name: str) -> str:
    refs = project.git("for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    (ref,) = [ref for ref in refs if ref.endswith(f"/{name}")]
    return ref


def torch_load(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# ---- sharing across machines -----------------------------------------------------------------------


def test_push_then_pull_into_a_fresh_clone_leaves_nothing_to_run(built: Build, tmp_path: Path) -> None:
    origin = built.project
    origin.dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    origin.dvc("push")
    assert "in sync" in output_of(origin.dvc("status", "--cloud"))
    commit(origin, "DVC remote")  # the remote's address travels with the repository

    clone = ProjectAt(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", str(origin.root), str(clone.root)], check=True)
    assert not (clone.root / "data" / "checkpoints").exists()
    clone.dvc("pull")  # only the enabled runs: no paper stage without recorded outputs
    for name in DEFAULT_EXPERIMENTS:
        checkpoint = Path("data") / "checkpoints" / name / "last.ckpt"
        assert (clone.root / checkpoint).read_bytes() == (origin.root / checkpoint).read_bytes()

    assert pipeline_status(clone) == {}
    assert stages_run(output_of(clone.dvc("repro"))) == []
    assert clone.git("status", "--porcelain").stdout == "", "the clone's repro rewrote tracked files"


# ---- changing one experiment's parameter -------------------------------------------------------


def test_changed_parameter_shows_only_that_experiments_stages_as_changed(changed: Change) -> None:
    # the summary and the picture read every enabled experiment's baseline (and the summary its
    # reported figures), so they are stale too
    stages = {f"{stage}@{CHANGED}" for stage in ("train", "evaluate", "sample")}
    assert set(changed.status_before) == stages | {"summary", "comparison"}
    for stage in stages:
        changes = changed.status_before[stage]
        assert {"changed deps": {"params.yaml": {f"experiments.{CHANGED}": "modified"}}} in changes, stage
    summary_change = {"changed deps": {"params.yaml": {f"experiments.{CHANGED}": "modified"}}}
    assert summary_change in changed.status_before["summary"]
    assert summary_change in changed.status_before["comparison"]


def test_changed_parameter_reruns_only_that_experiment(changed: Change) -> None:
    ran = stages_run(changed.repro_output)
    assert sorted(ran) == sorted([f"train@{CHANGED}", f"evaluate@{CHANGED}", f"sample@{CHANGED}", "summary",
                                  "comparison"])
    assert set(ran[-2:]) == {"summary", "comparison"}
    assert changed.untouched_after == changed.untouched_before
    assert pipeline_status(changed.project) == {}


def test_metrics_diff_reports_the_changed_experiment(changed: Change) -> None:
    project = changed.project
    diff = json.loads(project.dvc("metrics", "diff", "--json").stdout)  # HEAD (the first run) vs workspace
    path = f"metrics/{CHANGED}/eval.json"
    assert set(diff) == {path, f"metrics/{CHANGED}/live.json"}  # and the last training figures
    old = json.loads(project.git("show", f"HEAD:{path}").stdout)
    new = eval_metrics(project.root, CHANGED)
    moved = {key for key, value in new.items() if old.get(key) != value}
    assert "neg_elbo_bpd" in moved
    assert set(diff[path]) == moved
    for key in moved:
        assert (diff[path][key]["old"], diff[path][key]["new"]) == (old[key], new[key])


# ---- determinism -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rebuilt(built: Build, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """A second build from scratch, of the same source (other people may edit the checkout
    meanwhile): a git clone of the built project at the commit it started from, without any
    DVC cache, data or metrics."""
    project = ProjectAt(tmp_path_factory.mktemp("rebuilt") / "project")
    subprocess.run(["git", "clone", "-q", str(built.project.root), str(project.root)], check=True)
    project.git("checkout", "-q", built.source)
    assert not (project.root / "metrics" / DEFAULT_EXPERIMENTS[0]).exists()
    return Build(project, output_of(project.dvc("repro")), built.source)


@pytest.mark.slow
def test_rebuild_runs_every_default_stage(rebuilt: Build) -> None:
    assert Counter(stages_run(rebuilt.repro_output)) == Counter(DEFAULT_STAGES)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", DEFAULT_EXPERIMENTS)
def test_two_builds_from_scratch_give_identical_eval_json(
    built: Build, rebuilt: Build, experiment: str
) -> None:
    path = Path("metrics") / experiment / "eval.json"
    assert (rebuilt.project.root / path).read_text() == (built.project.root / path).read_text()


@pytest.mark.slow
def test_two_builds_from_scratch_give_identical_metrics_folders(built: Build, rebuilt: Build) -> None:
    """Training curves, sample grids and the summary as well."""
    first, second = (digests(build.project.root, ["metrics"]) for build in (built, rebuilt))
    assert first.keys() == second.keys()
    assert [path for path in first if first[path] != second[path]] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", [f"{step}@{dataset}" for step in ("download", "convert") for dataset in DEFAULT_DATASETS]
)
def test_two_builds_from_scratch_give_identical_data(built: Build, rebuilt: Build, stage: str) -> None:
    def outputs(build: Build) -> dict[str, str]:
        lock = yaml.safe_load((build.project.root / "dvc.lock").read_text())["stages"]
        return {out["path"]: out["md5"] for out in lock[stage]["outs"]}

    assert outputs(rebuilt) == outputs(built)
