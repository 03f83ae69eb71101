"""The DVC side: every stage lists the project modules it imports, the registry of enabled runs
(dvc.yaml's generated blocks), and curves written while training runs."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import yaml

from sdn.config import experiment_config
from sdn.errors import ConfigError, RegistryError
from sdn.params import load_params
from sdn.registry import (
    DEFAULT_RUNS,
    check_registry,
    enabled_runs,
    resolve_runs,
    run_dataset,
    with_blocks,
)
from tests.import_closure import import_closure
from tests.pipeline_project import REPO
from tests.reliability_tools import CrashAt, SimulatedCrash, Workdir, tiny_cfg

pytestmark = pytest.mark.usefixtures("isolated_torch")

STAGES = ("download", "convert", "train", "evaluate", "sample", "summary")


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(module: Path, deps: list[str]) -> bool:
    """Whether a dep (a file, or a folder holding the module) of `deps` covers `module`."""
    return any(module == Path(dep) or Path(dep) in module.parents for dep in deps)


# ---- every dependency tracked -------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_module_its_script_imports(stage: str) -> None:
    spec = dvc_stages()[stage]
    spec = spec.get("do", spec)
    script = Path(spec["cmd"].split()[1])
    deps = [dep for dep in spec["deps"] if "${" not in dep]
    missing = sorted(str(m) for m in import_closure(REPO / script, REPO) if not covered(m, deps))
    assert missing == [], f"dvc.yaml stage {stage} runs {missing} without listing them in its deps"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_list_no_module_it_does_not_import(stage: str) -> None:
    # tight: a change to a module re-runs only the stages that import it
    spec = dvc_stages()[stage]
    spec = spec.get("do", spec)
    closure = import_closure(REPO / spec["cmd"].split()[1], REPO)
    code = [dep for dep in spec["deps"] if dep.startswith(("sdn", "stages"))]
    unused = [dep for dep in code if not any(covered(module, [dep]) for module in closure)]
    assert unused == []


def test_data_stages_depend_on_neither_models_nor_layers() -> None:
    for stage in ("download", "convert", "summary"):
        closure = {str(m) for m in import_closure(REPO / "stages" / f"{stage}.py", REPO)}
        heavy = {"sdn/layers.py", "sdn/sweep.py", "sdn/training/module.py", "sdn/models/density.py"}
        assert not closure & heavy, stage
    for stage in ("download", "convert"):  # the data stages read params.yaml, and no model's settings
        closure = {str(m) for m in import_closure(REPO / "stages" / f"{stage}.py", REPO)}
        assert "sdn/params.py" in closure and "sdn/config.py" not in closure, stage
        assert not [m for m in closure if m.startswith("sdn/models/")], stage
    train = {str(m) for m in import_closure(REPO / "stages" / "train.py", REPO)}
    assert {"sdn/__init__.py", "sdn/layers.py", "sdn/sweep.py", "sdn/data/lmdb_store.py"} <= train
    assert "sdn/data/sources.py" not in train  # training reads LMDB only


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_import_closure_follows_function_level_and_lazy_imports(tmp_path: Path) -> None:
    write_package(tmp_path, {
        "script.py": "from sdn.a import f\n",
        "sdn/__init__.py": "def __getattr__(name):\n    if name == 'Heavy':\n        from sdn import heavy\n",
        "sdn/a.py": "def f():\n    from sdn.sub.b import g\n",
        "sdn/sub/__init__.py": "",
        "sdn/sub/b.py": "from sdn import Heavy\n",
        "sdn/heavy.py": "",
        "sdn/unused.py": "",
    })
    closure = {str(p) for p in import_closure(tmp_path / "script.py", tmp_path)}
    assert closure == {"script.py", "sdn/__init__.py", "sdn/a.py", "sdn/sub/__init__.py", "sdn/sub/b.py",
                       "sdn/heavy.py"}
    (tmp_path / "sdn/sub/b.py").write_text("import os\n")  # nobody asks for Heavy: not followed
    closure = {str(p) for p in import_closure(tmp_path / "script.py", tmp_path)}
    assert "sdn/heavy.py" not in closure and "sdn/sub/b.py" in closure


def test_lazy_attributes_still_import() -> None:
    code = "from sdn import SDNLayer; from sdn.models import build_model; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


# ---- the registry of enabled runs ---------------------------------------------------------------


def project_copy(tmp_path: Path) -> Path:
    """dvc.yaml, params.yaml and paper.yaml in `tmp_path`, the registry reset to the defaults: the
    checkout's own registry (whatever a user enabled) is never read."""
    for name in ("dvc.yaml", "params.yaml", "paper.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    sdn_pipeline(tmp_path, "reset")
    return tmp_path


def sdn_pipeline(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([sys.executable, "-m", "sdn", "pipeline", *args], cwd=root, env=env,
                            capture_output=True, text=True)
    assert (result.returncode == 0) == check, result.stderr
    return result


def test_checkout_registry_matches_its_dvc_yaml() -> None:
    # any state a user commits: the defaults, or with paper datasets enabled
    params = load_params(REPO / "params.yaml")
    runs = check_registry(params, REPO)
    assert set(DEFAULT_RUNS) <= set(runs)


def test_reset_enables_the_defaults_in_every_stage(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    params = load_params(root / "params.yaml")
    assert check_registry(params, root) == {name: run_dataset(params, name) for name in DEFAULT_RUNS}
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    in_params = {"file": "params.yaml"}
    assert stages["download"]["foreach"] == stages["convert"]["foreach"] == {"photos32": in_params,
                                                                             "sprites": in_params}
    assert stages["train"]["foreach"]["photos32-cnn"] == {"dataset": "photos32", "base": "photos32",
                                                          "file": "params.yaml"}
    assert stages["release"]["foreach"] == {}
    assert "vars" not in yaml.safe_load((root / "dvc.yaml").read_text())  # no `dvc exp show` columns


PAPER_NAMES = ("cifar10", "imagenet32", "celebahq256", "3dshapes", "celebahq256-release")


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_disable_restores_dvc_yaml_byte_for_byte(tmp_path: Path, name: str) -> None:
    root = project_copy(tmp_path)
    before = (root / "dvc.yaml").read_text()
    sdn_pipeline(root, "enable", name)
    assert (root / "dvc.yaml").read_text() != before
    sdn_pipeline(root, "disable", name)
    assert (root / "dvc.yaml").read_text() == before


def test_an_imported_run_has_no_training_stage_curve_or_picture_input(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    sdn_pipeline(root, "enable", "celebahq256-release")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert "celebahq256-release" in stages["release"]["foreach"]
    assert "celebahq256-release" in stages["evaluate"]["foreach"]
    assert "celebahq256-release" not in stages["train"]["foreach"]
    assert not [dep for dep in stages["comparison"]["deps"] if "celebahq256-release" in dep]
    assert "metrics/celebahq256-release/eval.json" in stages["summary"]["deps"]


def test_enable_a_dataset_adds_its_runs_and_their_summary_inputs_and_comparison(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    before = (root / "dvc.yaml").read_text()
    sdn_pipeline(root, "enable", "cifar10")
    runs = enabled_runs(root)
    assert list(runs) == [*DEFAULT_RUNS, "cifar10-sdn", "cifar10-cnn"]  # params.yaml, then paper.yaml
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert stages["download"]["foreach"]["cifar10"] == {"file": "paper.yaml"}
    assert stages["evaluate"]["foreach"]["cifar10-sdn"] == {"dataset": "cifar10", "base": "cifar10",
                                                            "file": "paper.yaml"}
    assert "metrics/cifar10-sdn/eval.json" in stages["summary"]["deps"]
    assert {"paper.yaml": ["experiments.cifar10-sdn", "bases.cifar10.dataset", "bases.cifar10.model",
                           "experiments.cifar10-cnn"]} in stages["summary"]["params"]
    pictured = stages["comparison"]["deps"]
    assert "metrics/cifar10-sdn/val.csv" in pictured and "metrics/cifar10-cnn/eval.json" in pictured
    assert "plots" not in dvc  # no top-level plot names a file a run has not written yet
    once = (root / "dvc.yaml").read_text()
    sdn_pipeline(root, "enable", "cifar10")  # idempotent
    assert (root / "dvc.yaml").read_text() == once
    sdn_pipeline(root, "disable", "cifar10")
    assert (root / "dvc.yaml").read_text() == before  # byte for byte


def test_registry_names_bad_input(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    error = sdn_pipeline(root, "enable", "cifar100", check=False).stderr
    assert "cifar100: neither an experiment nor a dataset of params.yaml or paper.yaml" in error
    text = (root / "dvc.yaml").read_text().replace("      - metrics/sprites-cnn/eval.json\n", "")
    (root / "dvc.yaml").write_text(text)
    assert "python -m sdn pipeline sync" in sdn_pipeline(root, "list", check=False).stderr
    sdn_pipeline(root, "sync")
    assert check_registry(load_params(root / "params.yaml"), root)
    with pytest.raises(RegistryError, match="expected one"):
        with_blocks("stages: {}\n", {"summary inputs": []})
    with pytest.raises(RegistryError, match="not in params.yaml or paper.yaml"):
        resolve_runs({"experiments": {}}, {"gone": "photos32"}, [], [])


def test_opt_in_runs_join_by_name_only_and_plain_make_leaves_them_out(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    params = load_params(root / "params.yaml")
    opt_in = [name for name, cfg in params["experiments"].items() if cfg.get("opt_in")]
    assert opt_in == ["photos32-long-sdn", "photos32-long-cnn"]
    assert not set(opt_in) & set(enabled_runs(root))  # the defaults leave them out
    sdn_pipeline(root, "enable", "photos32")  # the dataset enables its default runs only
    assert not set(opt_in) & set(enabled_runs(root))
    defaults = sdn_pipeline(root, "targets").stdout.split()
    assert defaults == [f"{stage}@{name}" for name in DEFAULT_RUNS for stage in ("evaluate", "sample")]
    sdn_pipeline(root, *["enable", *opt_in])
    assert set(opt_in) <= set(enabled_runs(root))
    assert sdn_pipeline(root, "targets").stdout.split() == defaults  # `make` still leaves them out
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    assert "metrics/photos32-long-sdn/eval.json" in dvc["stages"]["summary"]["deps"]
    assert "metrics/photos32-long-sdn/val.csv" in dvc["stages"]["comparison"]["deps"]
    assert "takes no names" in sdn_pipeline(root, "targets", "photos32", check=False).stderr


def test_opt_in_must_be_a_boolean() -> None:
    params = load_params(REPO / "params.yaml")
    params["experiments"]["photos32-long-sdn"]["opt_in"] = "yes"
    with pytest.raises(ConfigError, match=r"experiments\.photos32-long-sdn\.opt_in: expected true or false"):
        experiment_config(params, "photos32-long-sdn")


def test_enabled_paper_run_joins_the_dvc_stages(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)

    def stages() -> set[str]:
        out = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        return set(out.split())

    default = stages()
    assert not any("cifar10" in s or "imagenet32" in s or "3dshapes" in s or "celebahq" in s for s in default)
    sdn_pipeline(root, "enable", "cifar10")
    added = stages() - default
    assert added == {f"{s}@cifar10" for s in ("download", "convert")} | {
        f"{s}@cifar10-{arch}" for s in ("train", "evaluate", "sample") for arch in ("sdn", "cnn")}


# ---- live curves ----------------------------------------------------------------------------------


class ReadCurvesAt(pl.Callback):
    """Reads the curve files while training runs, when optimizer step `step` begins."""

    def __init__(self, metrics: Path, step: int) -> None:
        self.metrics, self.step, self.seen = metrics, step, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            self.seen = {
                "train": pd.read_csv(self.metrics / "train.csv")["step"].tolist(),
                "val": pd.read_csv(self.metrics / "val.csv")["step"].tolist(),
                "live": json.loads((self.metrics / "live.json").read_text()),
            }


def test_curves_are_on_disk_while_training_runs(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    cfg = tiny_cfg(max_steps=6, val_every_steps=3, ckpt_every_steps=6)
    reader = ReadCurvesAt(workdir.metrics, 6)
    workdir.train(cfg, [reader])
    assert reader.seen["train"] == [1, 2, 3, 4, 5] and reader.seen["val"] == [3]
    live = reader.seen["live"]
    assert live["step"] == 5 and set(live["train"]) == {"loss_bpd", "neg_elbo_bpd", "kl_bpd", "lr"}
    assert set(live["val"]) == {"neg_elbo_bpd", "kl_bpd", "images"}
    final = json.loads((workdir.metrics / "live.json").read_text())
    assert final["step"] == 6 and final["val"] == pd.read_csv(workdir.metrics / "val.csv").iloc[-1].drop(
        "step").to_dict()


def test_a_finished_run_run_again_rewrites_every_curve_file(tmp_path: Path) -> None:
    # `dvc repro` removes a stage's outputs before it runs; a run resumed at its last step trains
    # nothing, and must still leave train.csv, val.csv and live.json behind
    workdir = Workdir(tmp_path)
    cfg = tiny_cfg(max_steps=4, val_every_steps=2, ckpt_every_steps=2)
    workdir.train(cfg)
    before = {name: (workdir.metrics / name).read_bytes() for name in ("train.csv", "val.csv", "live.json")}
    for name in before:
        (workdir.metrics / name).unlink()
    workdir.train(cfg)
    assert {name: (workdir.metrics / name).read_bytes() for name in before} == before


def test_resumed_curves_repeat_and_miss_no_step(tmp_path: Path) -> None:
    # checkpoint every 2 steps; a crash at step 6 loses step 5's row, logged after the last checkpoint
    cfg = tiny_cfg(max_steps=8, val_every_steps=3, ckpt_every_steps=2)
    reference = Workdir(tmp_path / "reference")
    reference.train(cfg)
    crashed = Workdir(tmp_path / "crashed")
    with pytest.raises(SimulatedCrash):
        crashed.train(cfg, [CrashAt(6)])
    assert pd.read_csv(crashed.metrics / "train.csv")["step"].tolist() == [1, 2, 3, 4, 5]
    reader = ReadCurvesAt(crashed.metrics, 6)
    with pytest.raises(SimulatedCrash):
        crashed.train(cfg, [reader, CrashAt(7)])
    # resumed at step 4: step 5 was dropped with the rest of the lost work, then logged again once
    assert reader.seen["train"] == [1, 2, 3, 4, 5] and reader.seen["val"] == [3]
    crashed.train(cfg)
    for curve in ("train.csv", "val.csv", "live.json"):
        assert (crashed.metrics / curve).read_text() == (reference.metrics / curve).read_text(), curve
    assert pd.read_csv(crashed.metrics / "train.csv")["step"].tolist() == list(range(1, 9))


# ---- the locked environment -----------------------------------------------------------------------


def locked_versions() -> dict[str, str]:
    import re

    text = (REPO / "requirements.lock").read_text()
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)}


def test_lock_pins_every_declared_dependency_with_hashes() -> None:
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = locked_versions()
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for requirement in declared:
        name, version = requirement.split("==")
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert locked.get(key) == version, f"requirements.lock has {key} {locked.get(key)}: run `make lock`"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (REPO / "requirements.lock").read_text().split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    assert {"torch", "nvidia-cublas", "lightning-utilities", "dvc-data"} <= set(locked)  # transitive too


def test_console_script_runs_the_command_line() -> None:
    import tomllib

    from sdn.__main__ import main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sdn": "sdn.__main__:main"} and callable(main)
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0


# ---- `dvc exp run -S`: DVC's own rewrite of the parameter files -------------------------------------

OVERRIDE = re.compile(r"-S '([^']+)'")


def readme_overrides() -> list[tuple[str, str, str]]:
    """(file, dotted key, value) of every `-S` example of the README, sweeps expanded."""
    found = []
    for given in OVERRIDE.findall((REPO / "README.md").read_text()):
        file, _, assignment = given.rpartition(":") if ".yaml:" in given else ("params.yaml", "", given)
        key, _, values = assignment.partition("=")
        found += [(file, key, value) for value in values.split(",")]
    return found


def resolved(root: Path) -> dict[str, dict]:
    params = load_params(root / "params.yaml")
    return {name: dataclasses.asdict(experiment_config(params, name)) for name in params["experiments"]}


@pytest.mark.parametrize(("file", "key", "value"), readme_overrides())
def test_readme_overrides_change_exactly_their_line_with_dvcs_own_code(
    tmp_path: Path, file: str, key: str, value: str
) -> None:
    from dvc.utils.hydra import apply_overrides

    for name in ("params.yaml", "paper.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    before_text, before = (tmp_path / file).read_text(), resolved(tmp_path)
    apply_overrides(tmp_path / file, [f"{key}={value}"])
    after_text, after = (tmp_path / file).read_text(), resolved(tmp_path)
    diff = [line for line in difflib.ndiff(before_text.splitlines(), after_text.splitlines())
            if line[:1] in "+-"]
    removed, added = [d[2:] for d in diff if d[0] == "-"], [d[2:] for d in diff if d[0] == "+"]
    leaf = key.lstrip("+").rsplit(".", 1)[1]
    if key.startswith("+"):  # a key the experiment did not set yet: added, nothing else touched
        assert removed == [] and added[-1].strip() == f"{leaf}: {value}" and len(added) <= 2, diff
    else:
        assert len(removed) == len(added) == 1 and added[0].strip().startswith(f"{leaf}: {value}"), diff
    section, name, *rest = key.lstrip("+").split(".")
    params = load_params(tmp_path / "params.yaml")
    runs = [name] if section == "experiments" else [
        run for run, cfg in params["experiments"].items() if cfg["extends"] == name]
    assert runs and {run for run in after if after[run] != before[run]} == set(runs)  # the twin did not move
    for run in runs:
        leaf = after[run]
        for part in rest:
            leaf = leaf[part]
        assert str(leaf) == str(yaml.safe_load(value))


@pytest.mark.parametrize("file", ["params.yaml", "paper.yaml"])
def test_parameter_files_survive_dvcs_rewrite_byte_for_byte(tmp_path: Path, file: str) -> None:
    # `dvc exp run -S` rewrites the whole file through ruamel: anchors, flow-style lists, `null`, a
    # comment line after a list or a flow mapping wider than 80 columns would come back changed
    from dvc.utils.hydra import apply_overrides

    shutil.copy2(REPO / file, tmp_path / file)
    text = (tmp_path / file).read_text()
    first = next(iter(yaml.safe_load(text)["experiments"]))
    base = yaml.safe_load(text)["experiments"][first]["extends"]
    apply_overrides(tmp_path / file, [f"experiments.{first}.extends={base}"])
    assert (tmp_path / file).read_text() == text


def test_a_stopped_make_dataset_leaves_the_registry_as_it_was(tmp_path: Path) -> None:
    from tests.network_tools import closed_port_url
    from tests.pipeline_project import Project

    project = Project(tmp_path / "project")
    paper = project.root / "paper.yaml"
    cifar = load_params(project.root / "params.yaml")["datasets"]["cifar10"]["url"]
    paper.write_text(paper.read_text().replace(cifar, closed_port_url("/cifar-10-python.tar.gz")))
    before = (project.root / "dvc.yaml").read_text()
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "--no-print-directory", "-o", "install", f"VENV={venv}", "cifar10"],
                          cwd=project.root, env=project.env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach" in errors[0] and "`make cifar10`" in errors[0], done.stderr
    assert (project.root / "dvc.yaml").read_text() == before


@pytest.mark.slow
def test_the_suite_passes_with_every_paper_run_enabled_and_disabling_them_leaves_no_diff(
    tmp_path: Path,
) -> None:
    # the state README tells a user to commit after `make cifar10` (and the others): the tests
    # never read the checkout's registry, so they pass there as they do on the defaults
    root = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=root, check=True)
    sdn_pipeline(root, "enable", *PAPER_NAMES)
    env = {**os.environ, "PYTHONPATH": str(root)}
    pytest_command = [sys.executable, "-m", "pytest", "-m", "not slow", "-x", "-q", "-p", "no:cacheprovider"]
    suite = subprocess.run(pytest_command, cwd=root, env=env, capture_output=True, text=True, timeout=3000)
    assert suite.returncode == 0, suite.stdout[-4000:]
    sdn_pipeline(root, "disable", *PAPER_NAMES)
    diff = subprocess.run(["git", "diff", "--stat"], cwd=root, capture_output=True, text=True, check=True)
    assert diff.stdout == ""
