"""DVC stage `summary`: metrics/summary.md and metrics/summary.csv from every evaluated experiment."""

from pathlib import Path

from sdn.config import load_params, validate_params
from sdn.summary import summary_table, write_summary


def main() -> None:
    experiments = validate_params(load_params())
    write_summary(summary_table(experiments, Path("metrics")), Path("metrics"))


if __name__ == "__main__":
    main()
