"""Command line: `python -m sdn info <experiment>`, `python -m sdn inspect <dataset>`, `python -m sdn
pipeline enable|disable <dataset|experiment>` (which experiments dvc.yaml runs), `python -m sdn pin
<dataset|experiment>` (a downloaded file's checksum into params.yaml or paper.yaml) and `python -m sdn
readme`.

Installed as the `sdn` console script: `sdn info photos32-sdn`."""

from __future__ import annotations

import argparse
import json
import sys


def info(name: str) -> dict:
    """Parameter count and ladder structure of an experiment's model; needs no data.

    The count is the release's `count_pars` after its weight norm: a normalised conv counts its
    gains g (one per output channel) and directions v in place of its weight."""
    import torch

    from sdn.config import experiment_config
    from sdn.models import build_model, prepare_model
    from sdn.params import load_params
    from sdn.training.module import count_parameters

    cfg = experiment_config(load_params(), name)
    with torch.device("meta"):  # shapes only: instant and without memory even for 10^8 weights
        model = prepare_model(build_model(cfg), cfg.train)
    return {
        "experiment": name,
        "kind": cfg.kind,
        "dataset": cfg.dataset,
        "parameters": count_parameters(model),
        "weight_norm": cfg.train.weight_norm,
        **describe(model),
    }


def describe(model) -> dict:
    """JSON-ready structure of a model as built. A `DensityVAE`: per ladder layer (bottom to top)
    scale, SDN use, features and directions, then the last layer and the top's scale. A
    `DisentanglementVAE`: SDN use, features and directions of each decoder stage."""
    from sdn.hyperparameters import BETA_VAE_SCALES
    from sdn.layers import SDNLayer
    from sdn.models.density import DensityVAE

    if isinstance(model, DensityVAE):
        layers = [
            {
                "index": i,
                "scale": plan.scale,
                "downsample": plan.downsample,
                "sdn": plan.use_sdn,
                "sdn_features": plan.sdn_features,
                "directions": [plan.dirs_a, plan.dirs_b] if plan.use_sdn else None,
            }
            for i, plan in enumerate(model.plans)
        ]
        last = {"sdn": model.last_uses_sdn}
        if model.last_uses_sdn:
            last["sdn_features"] = model.cfg.sdn_nfeat_0
            last["directions"] = [c.direction for c in model.last_layer.sdn.corrections]
        return {"ladder": layers, "last_layer": last, "top_scale": model.top_scale}
    stages = []
    sdn_layers = iter(m for m in model.decoder if isinstance(m, SDNLayer))
    for scale, use_sdn in zip(BETA_VAE_SCALES, model.stage_uses_sdn, strict=True):
        entry = {"scale": scale, "sdn": use_sdn}
        if use_sdn:
            layer = next(sdn_layers)
            entry["sdn_features"] = layer.project_in.out_channels
            entry["directions"] = [c.direction for c in layer.corrections]
        stages.append(entry)
    return {"decoder_stages": stages}


def pipeline_command(action: str, names: list[str]) -> int:
    """Edit or show the registry of enabled runs (dvc.yaml's generated blocks)."""
    from sdn.errors import RegistryError
    from sdn.params import load_params
    from sdn.registry import (
        DEFAULT_RUNS,
        check_registry,
        enabled_runs,
        rebuilt_by_make,
        resolve_runs,
        write_registry,
    )

    params = load_params()
    if action in ("list", "targets", "sync", "reset") and names:
        raise RegistryError(f"`pipeline {action}` takes no names.")
    if action in ("enable", "disable") and not names:
        raise RegistryError(f"`pipeline {action}` needs a dataset or experiment name, e.g. cifar10.")
    if action == "list":
        for name, dataset in check_registry(params).items():
            print(f"{name}\t{dataset}")
        return 0
    if action == "targets":
        print(" ".join(rebuilt_by_make(params, check_registry(params))))
        return 0
    if action == "reset":
        runs = resolve_runs(params, {}, list(DEFAULT_RUNS), [])
    elif action == "sync":
        runs = resolve_runs(params, enabled_runs(), [], [])
    else:
        enable, disable = (names, []) if action == "enable" else ([], names)
        runs = resolve_runs(params, enabled_runs(), enable, disable)
    write_registry(params, runs)
    print(f"enabled: {', '.join(runs) or 'none'}")
    return 0


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
    commands.add_parser(
        "pin", help="write the checksum of a downloaded dataset's (or imported checkpoint's) kept file "
        "into the parameter file that defines it"
    ).add_argument("name", metavar="dataset|experiment")
    pipeline = commands.add_parser(
        "pipeline",
        help="the experiments dvc.yaml runs: list, targets (what `make` rebuilds), "
        "enable, disable, reset, sync",
    )
    pipeline.add_argument("action", choices=("list", "targets", "enable", "disable", "reset", "sync"))
    pipeline.add_argument("names", nargs="*", metavar="dataset|experiment")
    args = parser.parse_args(argv)

    from sdn.errors import SDNError

    try:
        if args.command == "pipeline":
            return pipeline_command(args.action, args.names)
        if args.command == "pin":
            from sdn.pinning import pin

            print(pin(args.name))
            return 0
        if args.command == "info":
            result = info(args.experiment)
        elif args.command == "readme":
            from pathlib import Path

            from sdn.atomic import write_text_atomic
            from sdn.summary import with_results

            readme = Path("README.md")
            summary = Path("metrics/summary.md").read_text()
            write_text_atomic(with_results(readme.read_text(), summary), readme)
            return 0
        else:
            from sdn.data.lmdb_store import inspect_dataset

            result = inspect_dataset(args.dataset, args.data_root)
    except (SDNError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
