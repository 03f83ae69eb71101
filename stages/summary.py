"""DVC stage `summary`: metrics/summary.md and metrics/summary.csv from the eval.json of every
enabled run, exactly the files dvc.yaml lists as this stage's deps."""

from pathlib import Path

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.config import validate_params
from sdn.params import load_params
from sdn.pipeline import run_stage
from sdn.registry import enabled_runs
from sdn.summary import summary_table, write_summary


def main() -> None:
    params = load_params()
    experiments = validate_params(params)
    enabled = enabled_runs()  # dvc.yaml lists their eval.json as deps: nothing else is read
    chosen = [cfg for cfg in experiments if cfg.name in enabled]
    write_summary(summary_table(chosen, Path("metrics")), Path("metrics"))


if __name__ == "__main__":
    run_stage(main, "python stages/summary.py")
