"""DVC stage `comparison`: metrics/comparison.png, each enabled SDN run's validation curves beside
its CNN baseline's, with their final evaluation, drawn with matplotlib from the val.csv and eval.json
files dvc.yaml lists as this stage's deps (an imported run, which never trains, takes no panel).

Writes metrics/comparison.png, the picture the README shows.
"""

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.params import load_params
from sdn.pipeline import METRICS, run_stage
from sdn.plots import draw_comparison
from sdn.registry import enabled_runs


def main() -> None:
    print(f"[sdn] {draw_comparison(load_params(), enabled_runs(), METRICS / 'comparison.png')}")


if __name__ == "__main__":
    run_stage(main, "python stages/comparison.py")
