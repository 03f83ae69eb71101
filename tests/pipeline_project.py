"""A throw-away copy of this project, with micro experiments, for tests that drive the real
pipeline (`dvc repro`, stages as subprocesses) without touching the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sdn.registry import DEFAULT_RUNS, resolve_runs, write_registry

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Micro versions of the default experiments: seconds per stage on 2 CPU cores.
MICRO_DATASETS: dict[str, dict[str, Any]] = {
    "photos32": {"photos": ["astronaut", "coffee", "chelsea"], "val_photos": ["chelsea"], "stride": 32,
                 "reductions": [1]},
    "sprites": {"count": 400, "val_fraction": 0.25},
}
MICRO_DENSITY = {"z_size": 2, "h_size": 8, "depth": 2, "ds_list": [0], "sdn_nfeat_0": 8,
                 "mix_components": 2}
MICRO_TRAIN = {"batch_size": 8, "max_steps": 4, "val_every_steps": 2, "val_batches": 1, "ckpt_every_steps": 2}
MICRO_EVALUATE = {"iw_samples": 2, "batch_size": 16, "chunk_size": 32, "max_images": 16,
                  "disentanglement_points": 200, "disentanglement_repeats": 2, "beta_vae_train": 200,
                  "beta_vae_eval": 100, "factor_vae_train": 200, "factor_vae_eval": 100, "mig_points": 200,
                  "dci_train": 80, "dci_test": 40}
MICRO_SAMPLE = {"grid": 2, "temperatures": [1.0]}


def micro_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with the default experiments, their bases and datasets shrunk to micro size."""
    for dataset, override in MICRO_DATASETS.items():
        params["datasets"][dataset].update(override)
    params["trainer"]["progress_bar"] = False
    for base in params["bases"].values():
        if base["dataset"] not in MICRO_DATASETS:
            continue
        base["train"].update(MICRO_TRAIN)
        base["evaluate"].update(MICRO_EVALUATE)
        base["sample"].update(MICRO_SAMPLE)
        if base["model"]["kind"] == "density":
            base["sample"].update({"interpolation_layers": [1], "interpolation_steps": 2,
                                   "neighbourhood_layers": 1, "nearest_samples": 2, "nearest_k": 2})
    for exp in params["experiments"].values():
        base = params["bases"][exp["extends"]]
        if base["dataset"] not in MICRO_DATASETS:
            continue
        model = {**base["model"], **exp.get("model", {})}
        own = exp.setdefault("model", {})
        if model["kind"] == "density":
            keep_cnn = {k: v for k, v in MICRO_DENSITY.items() if k != "sdn_nfeat_0" or model["sdn_nfeat_0"]}
            base["model"].update({k: v for k, v in keep_cnn.items() if k not in own})
            own.update({k: v for k, v in keep_cnn.items() if k in own})
        else:
            base["model"]["z_size"] = 3
            own["sdn_nfeat_0"] = 8 if model["sdn_nfeat_0"] else 0
        exp.pop("train", None)  # the showcase's longer runs are micro runs too
    return params


class _PlainDumper(yaml.SafeDumper):
    """Writes shared mappings out in full: no anchors, so editing one experiment edits only it."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class Project:
    """A copy of the repository's code and configuration (tracked and untracked-but-not-ignored
    files, without the committed results) in its own git repo."""

    def __init__(self, root: Path) -> None:
        self.root = root
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
            capture_output=True, text=True,
        ).stdout.split("\0")
        for name in filter(None, files):
            if name == "dvc.lock" or name.startswith("metrics/"):
                continue  # the committed results belong to the full-size runs, not these micro ones
            source = REPO / name
            if source.is_file():
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        self.write_params(micro_params(self.read_params()))
        # The committed opt-in runs (the showcase) exercise nothing the defaults do not: the micro
        # project runs the four defaults, as a fresh `sdn pipeline reset` leaves them.
        write_registry(self.read_params(), resolve_runs(self.read_params(), {}, list(DEFAULT_RUNS), []), root)
        self.git("init", "-q")
        self.git("add", "-A")
        self.git("-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        env["PYTHONPATH"] = str(self.root)  # the copy's `sdn`, not the checkout's editable install
        env["DVC_NO_ANALYTICS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def read_params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict[str, Any]) -> None:
        text = yaml.dump(params, Dumper=_PlainDumper, sort_keys=False)
        (self.root / "params.yaml").write_text(text)

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kwargs
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                f"stderr:\n{result.stderr[-4000:]}"
            )
        return result

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, **kwargs)

    def stage(self, script: str, name: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "python"), f"stages/{script}.py", name, **kwargs)

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=self.root, check=True, capture_output=True, text=True)
