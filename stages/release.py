"""DVC stage `release@<experiment>`: import the authors' checkpoint of an experiment.

Reads data/raw/<experiment>/<release.file> (placed by hand, verified against release.sha256) and
writes data/checkpoints/<experiment>/last.ckpt, which the evaluate and sample stages load.
"""

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.config import experiment_config, validate_params
from sdn.params import load_params
from sdn.pipeline import DATA, checkpoint_dir, run_stage
from sdn.release import import_release


def main(name: str) -> None:
    params = load_params()
    validate_params(params)
    cfg = experiment_config(params, name)
    import_release(cfg, DATA / "raw", checkpoint_dir(name))


if __name__ == "__main__":
    run_stage(main, "python stages/release.py <experiment>")
