"""DVC stage `summary`: metrics/summary.md and metrics/summary.csv from every evaluated experiment.

Reads params.yaml and metrics/<experiment>/eval.json of each experiment that has one.
"""

from pathlib import Path

from sdn.config import load_params, validate_params
from sdn.pipeline import run_stage
from sdn.summary import summary_table, write_summary


def main() -> None:
    experiments = validate_params(load_params())
    write_summary(summary_table(experiments, Path("metrics")), Path("metrics"))


if __name__ == "__main__":
    run_stage(main, "python stages/summary.py")
