"""DVC stage `train@<experiment>`: train (or resume) one experiment.

A checkpoint is resumed only if the same configuration and the same code (the stage's code deps
in dvc.yaml) made it; otherwise training starts from step 0. A finished run trains nothing.

Writes data/checkpoints/<experiment>/last.ckpt and metrics/<experiment>/{train,val}.csv.
"""

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.config import experiment_config, validate_params
from sdn.errors import ConfigError
from sdn.params import load_params
from sdn.pipeline import checkpoint_dir, lmdb_dir, metrics_dir, run_stage, stage_code
from sdn.training.run import train_experiment


def main(name: str) -> None:
    params = load_params()
    validate_params(params)
    cfg = experiment_config(params, name)
    if cfg.release is not None:
        raise ConfigError(
            f"experiments.{name} imports the authors' checkpoint (its `release:` section) and is not "
            f"trained here: run `python stages/release.py {name}` (or `make {name}`)."
        )
    # a checkpoint resumes only if this code (what DVC hashes as the stage's code deps) made it
    code = stage_code("train")
    train_experiment(cfg, lmdb_dir(cfg.dataset), checkpoint_dir(name), metrics_dir(name), code=code)


if __name__ == "__main__":
    run_stage(main, "python stages/train.py <experiment>")
