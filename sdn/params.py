"""Reading `params.yaml` and, beside it, `paper.yaml` into one plain dict: the one source of
truth for every stage. Which file defines each dataset, base and experiment; a dataset's section.

Every stage reads its parameters here; the data stages need nothing more (`sdn.config` checks the
experiments against the models' hyper-parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sdn.errors import ConfigError, did_you_mean
from sdn.schema import reject_unknown

PARAMS_FILE = Path("params.yaml")
# Read with params.yaml, from the same folder: the paper's runs, which no stage tracks until enabled
# (`dvc exp show` shows the whole of params.yaml, but only the tracked keys of other files).
PAPER_FILE = "paper.yaml"
# The sections whose entries are named, each defined in one of the two files.
NAMED_SECTIONS = ("datasets", "bases", "experiments")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: run stages from the repository root, where params.yaml is.")
    with path.open() as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}.")
    return data


def params_files(path: str | Path = PARAMS_FILE) -> list[Path]:
    """params.yaml and, where it exists beside it, paper.yaml."""
    path = Path(path)
    paper = path.parent / PAPER_FILE
    return [path, paper] if paper.is_file() else [path]


def defining_files(path: str | Path = PARAMS_FILE) -> dict[str, dict[str, str]]:
    """For each section (datasets, bases, experiments), which file (its name, as dvc.yaml names it)
    defines each entry."""
    found: dict[str, dict[str, str]] = {section: {} for section in NAMED_SECTIONS}
    for file in params_files(path):
        data = _read_yaml(file)
        for section in NAMED_SECTIONS:
            entries = data.get(section) or {}
            if isinstance(entries, dict):
                for name in entries:
                    found[section].setdefault(name, file.name)
    return found


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml, with paper.yaml beside it merged in, as a plain dict. A dataset, base or
    experiment is defined in one of the two files only."""
    files = params_files(path)
    params = _read_yaml(files[0])
    for extra in files[1:]:
        data = _read_yaml(extra)
        reject_unknown(data, NAMED_SECTIONS, extra.name, "unknown section (`trainer` is params.yaml's)")
        for section, entries in data.items():
            if entries is None:
                continue
            if not isinstance(entries, dict):
                raise ConfigError(f"{extra.name}: {section}: expected a mapping, got {entries!r}.")
            merged = params.setdefault(section, {}) or {}
            if not isinstance(merged, dict):
                raise ConfigError(f"{files[0]}: {section}: expected a mapping, got {type(merged).__name__}.")
            twice = sorted(set(merged) & set(entries))
            if twice:
                raise ConfigError(f"{section}.{twice[0]}: defined in both {files[0].name} and {extra.name}; "
                                  "keep one of them.")
            params[section] = {**merged, **entries}
    return params


def dataset_config(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The `datasets.<name>` section, or an error listing the datasets that exist."""
    datasets = params.get("datasets") or {}
    if name not in datasets:
        hint = did_you_mean(name, sorted(datasets))
        raise ConfigError(f"datasets.{name}: no such dataset in params.yaml or {PAPER_FILE}.{hint}")
    return datasets[name]
