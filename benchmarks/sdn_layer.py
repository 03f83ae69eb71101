"""SDN layer vs the same layer sweeping with `sdn.sweep.reference_sweep`, a plain per-line
nn.GRUCell autograd loop: forward+backward time, saved bytes.

    .venv/bin/python benchmarks/sdn_layer.py [--repeats 5] [--threads N]

Both run the same SDNLayer parameters in one process; timings are medians of interleaved
repeats, so load from other processes hits both alike. Saved bytes count every tensor autograd
keeps for backward (deduplicated by storage), except the module parameters, which exist anyway.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdn import SDNLayer
from sdn.sweep import reference_sweep


@dataclass(frozen=True)
class Case:
    batch: int
    in_channels: int
    out_channels: int
    num_features: int
    height: int
    width: int
    directions: tuple[int, ...]


CASES = [
    Case(4, 200, 400, 360, 32, 32, (0, 1)),  # CIFAR-10 sized (F 360, 32x32): target time <= 1.25x the loop
    Case(8, 64, 64, 64, 16, 16, (0, 1)),  # small maps: target >= 1.5x faster than the loop
    Case(8, 64, 64, 128, 32, 32, (0, 1, 2, 3)),
    Case(16, 32, 32, 32, 8, 8, (3, 0, 2)),
    Case(4, 64, 64, 96, 16, 48, (0, 2)),
]


def loop_layer(layer: SDNLayer, x: Tensor) -> Tensor:
    a = torch.tanh(layer.project_in(x))
    for correction in layer.corrections:
        a = reference_sweep(a, correction.cell, correction.direction)
    return layer.project_out(a)


def saved_bytes(run: Callable[[], Tensor], parameters: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `run()`."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def time_step(run: Callable[[], Tensor], grad: Tensor) -> float:
    start = time.perf_counter()
    run().backward(grad)
    return time.perf_counter() - start


def bench(case: Case, repeats: int, min_seconds: float) -> dict[str, float]:
    torch.manual_seed(0)
    layer = SDNLayer(case.in_channels, case.out_channels, case.num_features, list(case.directions))
    x = torch.randn(case.batch, case.in_channels, case.height, case.width)
    grad = torch.randn(case.batch, case.out_channels, case.height, case.width)
    runs = {"sdn": lambda: layer(x), "loop": lambda: loop_layer(layer, x)}
    parameters = list(layer.parameters())
    result = {f"{name}_bytes": saved_bytes(run, parameters) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    warm_up = sum(time_step(run, grad) for run in runs.values())
    # small cases are cheap but noisy: give each case at least `min_seconds` of repeats
    repeats = max(repeats, min(100, int(min_seconds / warm_up)))
    for repeat in range(repeats):
        order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
        for name in order:
            times[name].append(time_step(runs[name], grad))
    for name in runs:
        result[f"{name}_s"] = statistics.median(times[name])
    result["map_bytes"] = case.batch * case.num_features * case.height * case.width * 4
    result["repeats"] = repeats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="least timed repeats per case")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=4.0,
        help="repeat a case until about this much time is spent on it",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: unchanged)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"forward+backward: median of n interleaved repeats"
    )
    header = (
        f"{'B':>3} {'in':>4} {'out':>4} {'F':>4} {'HxW':>6} {'dirs':>8} | {'n':>3} "
        f"{'sdn ms':>8} {'loop ms':>8} {'speedup':>7} | "
        f"{'sdn MB':>7} {'loop MB':>8} {'maps':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for case in CASES:
        r = bench(case, args.repeats, args.min_seconds)
        maps = f"{r['sdn_bytes'] / r['map_bytes']:.1f}/{r['loop_bytes'] / r['map_bytes']:.1f}"
        print(
            f"{case.batch:>3} {case.in_channels:>4} {case.out_channels:>4} "
            f"{case.num_features:>4} {f'{case.height}x{case.width}':>6} "
            f"{''.join(map(str, case.directions)):>8} | {r['repeats']:>3} "
            f"{r['sdn_s'] * 1e3:>8.1f} {r['loop_s'] * 1e3:>8.1f} "
            f"{r['loop_s'] / r['sdn_s']:>6.2f}x | "
            f"{r['sdn_bytes'] / 2**20:>7.1f} {r['loop_bytes'] / 2**20:>8.1f} {maps:>11} "
            f"{r['loop_bytes'] / r['sdn_bytes']:>5.1f}x",
            flush=True,
        )
    print(
        "speedup = loop time / sdn time; maps = saved bytes / bytes of one (B, F, H, W) "
        "float32 map (sdn/loop); ratio = loop bytes / sdn bytes"
    )


if __name__ == "__main__":
    main()
