"""DVC stage `sample@<experiment>`: see sdn.evaluation.run.sample_experiment.

Writes metrics/<experiment>/samples/*.png (sample grids and the model's other pictures).
"""

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.config import experiment_config, validate_params
from sdn.evaluation.run import sample_experiment
from sdn.params import load_params
from sdn.pipeline import checkpoint_dir, lmdb_dir, metrics_dir, run_stage


def main(name: str) -> None:
    params = load_params()
    validate_params(params)
    cfg = experiment_config(params, name)
    sample_experiment(cfg, lmdb_dir(cfg.dataset), checkpoint_dir(name), metrics_dir(name) / "samples")


if __name__ == "__main__":
    run_stage(main, "python stages/sample.py <experiment>")
