"""Seconds per training step of an SDN experiment and its CNN baseline: what "matched wall-clock"
means when the two are compared.

Builds both models from params.yaml and times whole optimizer steps (observation preprocessing,
forward, the training loss, backward, Adamax) on random images at each experiment's batch size.
The two alternate step by step in one process, so machine noise hits both; the table gives
medians over the repeats and the median of the per-repeat ratios. Run from the repository root:

    python benchmarks/step_time.py [photos32-sdn] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdn.config import experiment_config
from sdn.params import load_params
from sdn.training.module import VAEModule, count_parameters


def one_step(module: VAEModule, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    started = time.perf_counter()
    out = module.model(module.model.obs.preprocess(images))
    module.model.loss(out, step=0).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="photos32-sdn", help="an SDN run with a baseline")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params()
    sdn = experiment_config(params, args.experiment)
    if sdn.baseline is None:
        raise SystemExit(f"{args.experiment} has no baseline in params.yaml: name an SDN run (photos32-sdn)")
    runs = {name: experiment_config(params, name) for name in (sdn.name, sdn.baseline)}
    modules = {name: VAEModule(cfg) for name, cfg in runs.items()}
    optimizers = {name: torch.optim.Adamax(m.parameters(), lr=cfg.train.lr) for (name, cfg), m in
                  zip(runs.items(), modules.values(), strict=True)}
    generator = torch.Generator().manual_seed(0)
    batches = {
        name: torch.randint(0, 256, (cfg.train.batch_size, cfg.model.channels, cfg.model.image_size,
                                     cfg.model.image_size), dtype=torch.uint8, generator=generator)
        for name, cfg in runs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 2):  # two warm-up rounds
        for name in runs:
            seconds = one_step(modules[name], optimizers[name], batches[name])
            if repeat >= 2:
                times[name].append(seconds)
    first, second = runs
    ratio = statistics.median(a / b for a, b in zip(times[first], times[second], strict=True))
    print(f"{args.threads} threads, {args.repeats} repeats, median seconds per optimizer step:")
    for name, cfg in runs.items():
        print(f"  {name:<20} batch {cfg.train.batch_size:>3}  {count_parameters(modules[name].model):>10,} "
              f"parameters  {statistics.median(times[name]):.3f} s")
    print(f"  {first} / {second}: {ratio:.2f}")


if __name__ == "__main__":
    main()
