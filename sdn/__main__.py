"""Command line: `python -m sdn info <experiment>` and `python -m sdn inspect <dataset>`."""

from __future__ import annotations

import argparse
import json
import sys


def info(name: str) -> dict:
    """Parameter count and ladder structure of an experiment's model; needs no data."""
    from sdn.config import build_model, experiment_config, load_params
    from sdn.training import count_parameters, prepare_model

    cfg = experiment_config(load_params(), name)
    model = prepare_model(build_model(cfg), cfg.train)
    return {
        "experiment": name,
        "kind": cfg.kind,
        "dataset": cfg.dataset,
        "parameters": count_parameters(model),
        **model.describe(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="model structure and parameter count of an experiment").add_argument(
        "experiment"
    )
    inspect = commands.add_parser(
        "inspect", help="splits, counts, shapes and labels of a converted dataset (every record checked)"
    )
    inspect.add_argument("dataset")
    inspect.add_argument("--data-root", default="data")
    commands.add_parser("readme", help="copy the table of metrics/summary.md into README.md")
    args = parser.parse_args(argv)

    from sdn.config import ConfigError
    from sdn.data import DataError

    try:
        if args.command == "info":
            result = info(args.experiment)
        elif args.command == "readme":
            from pathlib import Path

            from sdn.summary import with_results

            readme = Path("README.md")
            readme.write_text(with_results(readme.read_text(), Path("metrics/summary.md").read_text()))
            return 0
        else:
            from sdn.data import inspect_dataset

            result = inspect_dataset(args.dataset, args.data_root)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
