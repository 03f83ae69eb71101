"""What the `evaluate` and `sample` stages compute for one trained experiment."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from sdn.config import ExperimentConfig
from sdn.evaluation import samples as pictures
from sdn.evaluation.likelihood import evaluate_density
from sdn.training import LAST_CHECKPOINT, ShardSampler, _check_image_shape, _dataset, load_ema_model


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # metrics/ is in git: leave no half-written file there
        raise


def _load(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path, split: str):
    torch.manual_seed(cfg.seed)
    model = load_ema_model(cfg, ckpt_dir / LAST_CHECKPOINT)
    data = _dataset(lmdb_dir, split, cfg.dataset)
    _check_image_shape(data, cfg, split)
    return model, data


def _batches(model, data, batch_size: int, limit: int | None):
    loader = DataLoader(data, batch_size=batch_size, sampler=ShardSampler(len(data), limit=limit))
    for images, *_ in loader:
        yield model.obs.preprocess(images)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    # Printed precision of the committed metrics: stable across runs, honest about noise.
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


@torch.no_grad()
def evaluate_experiment(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path, out_dir: Path) -> dict:
    """−ELBO, KL and importance-weighted NLL in bits/dim on the validation split (EMA weights);
    for β-VAEs also the four disentanglement scores on the labelled set."""
    model, data = _load(cfg, lmdb_dir, ckpt_dir, "val")
    ev = cfg.evaluate
    started = time.perf_counter()
    metrics = evaluate_density(
        model.elbo, _batches(model, data, ev.batch_size, ev.max_images),
        num_samples=ev.iw_samples, chunk_size=ev.chunk_size, dims_per_image=model.dims_per_image,
    )
    # evaluate_density's `elbo_bpd` is −ELBO in bits/dim; name it for what it is
    metrics["neg_elbo_bpd"] = metrics.pop("elbo_bpd")
    metrics["neg_elbo_bpd_stderr"] = metrics.pop("elbo_bpd_stderr")
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    # wall time is printed, not stored: the metrics file must be identical across reruns
    print(f"[sdn] {cfg.name}: evaluated {metrics['num_images']} images x {ev.iw_samples} samples "
          f"in {time.perf_counter() - started:.1f} s")
    if cfg.kind == "disentanglement":
        metrics.update(disentanglement_scores(cfg, model, lmdb_dir))
    metrics = _rounded(metrics)
    write_json_atomic(metrics, out_dir / "eval.json")
    return metrics


@torch.no_grad()
def disentanglement_scores(cfg: ExperimentConfig, model, lmdb_dir: Path) -> dict[str, float]:
    """Encode labelled images (posterior means) and score the codes against their factors."""
    from sdn.evaluation import disentanglement as metrics

    data = _dataset(lmdb_dir, "train", cfg.dataset)
    count = min(len(data), cfg.evaluate.disentanglement_points)
    generator = torch.Generator().manual_seed(cfg.seed)
    indices = torch.randperm(len(data), generator=generator)[:count].tolist()
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=cfg.evaluate.batch_size)
    codes, factors = [], []
    for images, labels in loader:
        codes.append(model.encode(model.obs.preprocess(images)).numpy())
        factors.append(labels.numpy())
    codes_np = np.concatenate(codes).astype(np.float64)
    factors_np = np.concatenate(factors).astype(np.int64)
    seed = cfg.seed
    dci = metrics.dci(codes_np, factors_np, max_points=cfg.evaluate.dci_points, seed=seed)
    return {
        "beta_vae": metrics.beta_vae(codes_np, factors_np, seed=seed),
        "factor_vae": metrics.factor_vae(codes_np, factors_np, seed=seed),
        "mig": metrics.mig(codes_np, factors_np),
        "dci_disentanglement": dci["disentanglement"],
        "dci_completeness": dci["completeness"],
        "dci_informativeness": dci["informativeness"],
        "disentanglement_images": count,
    }


@torch.no_grad()
def sample_experiment(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path, out_dir: Path) -> list[Path]:
    """Sample grids at each temperature, plus interpolations, neighbourhoods and nearest
    training images (density) or reconstructions and traversals (β-VAE)."""
    model, val = _load(cfg, lmdb_dir, ckpt_dir, "val")
    sc = cfg.sample
    n = sc.grid
    written = []

    def save(images, name, nrow):
        path = out_dir / name
        pictures.save_grid(images, path, nrow)
        written.append(path)

    for t in sc.temperatures:
        save(pictures.sample_grid(model, n * n, t), f"samples_t{t:g}.png", n)
    first = next(iter(DataLoader(val, batch_size=max(4, n))))[0]
    x = model.obs.preprocess(first)
    if cfg.kind == "density":
        for layers in sc.interpolation_layers:
            rows = [
                pictures.interpolate_density(
                    model, x[2 * i : 2 * i + 2], layers, sc.interpolation_steps, sc.interpolation_temperature
                )
                for i in range(2)
            ]
            save(torch.cat(rows), f"interpolation_l{layers}.png", sc.interpolation_steps + 2)
        save(
            pictures.neighbourhood(
                model, x[:4], sc.neighbourhood_layers, n - 1, sc.neighbourhood_temperature
            ),
            "neighbourhood.png", n,
        )
        save(_nearest(cfg, model, lmdb_dir), "nearest_train.png", sc.nearest_k + 1)
    else:
        save(pictures.reconstructions(model, x[:n]), "reconstructions.png", 2 * int(math.sqrt(n)))
        save(pictures.traversals(model, x[:1]), "traversals.png", 8)
    return written


def _nearest(cfg: ExperimentConfig, model, lmdb_dir: Path) -> torch.Tensor:
    """Rows: a sample, then its nearest training images (an overfitting check)."""
    train = _dataset(lmdb_dir, "train", cfg.dataset)

    def chunks():
        for images, *_ in DataLoader(train, batch_size=2048):
            yield model.obs.postprocess(model.obs.preprocess(images))

    samples = pictures.sample_grid(model, cfg.sample.nearest_samples, cfg.sample.temperatures[-1])
    indices, _ = pictures.nearest_training_images(samples, chunks(), cfg.sample.nearest_k)
    rows = []
    for sample, idx in zip(samples, indices, strict=True):
        neighbours = torch.stack([train[int(i)][0] for i in idx])
        rows.append(torch.cat([sample[None], model.obs.postprocess(model.obs.preprocess(neighbours))]))
    return torch.cat(rows)
