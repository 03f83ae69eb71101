"""Editing the parameters of one experiment in a test, whatever its base shares with others."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sdn.config import OVERRIDDEN
from sdn.params import PAPER_FILE, defining_files

REPO = Path(__file__).resolve().parents[1]

# Keys an experiment takes from its base alone (shared by every run that extends it).
BASE_ONLY = ("dataset", "seed", "evaluate", "sample")


def base_of(params: dict[str, Any], name: str) -> dict[str, Any]:
    return params["bases"][params["experiments"][name]["extends"]]


def dataset_of(params: dict[str, Any], name: str) -> str:
    return base_of(params, name)["dataset"]


def detach(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Give experiment `name` a base of its own (named after it), a copy of its base's, and its
    complete `model` and `train` sections, so that editing either (or `params["bases"][name]`)
    changes this experiment alone. Returns the experiment's mapping."""
    experiment = copy.deepcopy(params["experiments"][name])
    base = copy.deepcopy(base_of(params, name))
    for section in OVERRIDDEN:
        experiment[section] = {**base.get(section, {}), **experiment.get(section, {})}
    params.setdefault("bases", {})[name] = base
    experiment["extends"] = name
    params["experiments"][name] = experiment
    return experiment


def section_of(params: dict[str, Any], name: str, section: str) -> dict[str, Any]:
    """The mapping that sets `section` of detached experiment `name`: its own (model, train,
    trainer) or its base's (evaluate, sample)."""
    owner = params["bases"][name] if section in BASE_ONLY else params["experiments"][name]
    return owner.setdefault(section, {})


def write_params_files(
    root: Path, params: dict[str, Any], dump: Callable[[Any], str] = yaml.safe_dump
) -> None:
    """Write `params` (as `load_params` merges them) back into params.yaml and paper.yaml under
    `root`: each dataset, base and experiment to the file of the repository that defines it."""
    where = defining_files(REPO / "params.yaml")
    files: dict[str, dict[str, Any]] = {"params.yaml": {}, PAPER_FILE: {}}
    for section, entries in params.items():
        if section not in where:
            files["params.yaml"][section] = entries
            continue
        for name, entry in entries.items():
            file = where[section].get(name, "params.yaml")
            files[file].setdefault(section, {})[name] = entry
    for file, content in files.items():
        if content or file == "params.yaml":
            (root / file).write_text(dump(content))
        else:
            (root / file).unlink(missing_ok=True)
