"""What the `evaluate` and `sample` stages compute for one trained experiment.

Both run on the experiment's accelerator (the first GPU where `trainer.accelerator` gives one,
see `sdn.evaluation.device`) under its precision, and show a progress bar for every long step
when `trainer.progress_bar` is on.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sdn.atomic import replace_dir, temp_dir, write_json_atomic
from sdn.config import ExperimentConfig
from sdn.data.datamodule import ImageDataModule
from sdn.evaluation import samples as pictures
from sdn.evaluation.device import experiment_device, precision_context, precision_used
from sdn.evaluation.likelihood import evaluate_density
from sdn.evaluation.spectrum import nyquist_share
from sdn.training.checkpoints import LAST_CHECKPOINT
from sdn.training.module import load_ema_model

# The pictures the sample stage draws for each kind of model besides its sample grids, in drawing
# order: what each model learnt shows differently (a ladder's layers, a β-VAE's codes).
PICTURES = {
    "density": ("interpolations", "neighbourhood", "nearest_train"),
    "disentanglement": ("reconstructions", "traversals"),
}
# The kinds of model whose codes evaluation scores against the data's factors of variation.
SCORES_FACTORS = ("disentanglement",)


def _load(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path):
    """The EMA model on the experiment's device, and the experiment's data (validation split
    opened and checked)."""
    device = experiment_device(cfg.trainer)
    torch.manual_seed(cfg.seed)  # seeds the CPU and every GPU generator
    # load_ema_model reads the checkpoint onto the CPU, whatever device saved it; then move it
    model = load_ema_model(cfg, ckpt_dir / LAST_CHECKPOINT).to(device)
    data = ImageDataModule.for_experiment(cfg, lmdb_dir, splits=("val",), pin_memory=device.type == "cuda")
    return model, data, device


def _batches(model, data: ImageDataModule, batch_size: int, limit: int | None, device: torch.device):
    for images, *_ in data.shard_loader("val", batch_size, limit):
        yield model.obs.preprocess(images.to(device, non_blocking=data.pin_memory))


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    # Printed precision of the committed metrics: stable across runs, honest about noise.
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


@torch.no_grad()
def evaluate_experiment(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path, out_dir: Path) -> dict:
    """−ELBO (one sample per image), KL and importance-weighted NLL in bits/dim on the validation
    split (EMA weights), each with its standard error over images; for β-VAEs also the four
    disentanglement scores on the labelled set, each with its standard error."""
    model, data, device = _load(cfg, lmdb_dir, ckpt_dir)
    ev, precision = cfg.evaluate, cfg.trainer.precision

    def elbo(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with precision_context(precision, device):
            return model.elbo(x)

    started = time.perf_counter()
    metrics = evaluate_density(
        elbo, _batches(model, data, ev.batch_size, ev.max_images, device),
        num_samples=ev.iw_samples, chunk_size=ev.chunk_size, dims_per_image=model.dims_per_image,
        progress=cfg.trainer.progress_bar,
    )
    # evaluate_density's `elbo_bpd` is −ELBO in bits/dim; name it for what it is
    metrics["neg_elbo_bpd"] = metrics.pop("elbo_bpd")
    metrics["neg_elbo_bpd_se"] = metrics.pop("elbo_bpd_se")
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    # wall time and device are printed, not stored: the metrics file must be identical across reruns
    print(f"[sdn] {cfg.name}: evaluated {metrics['num_images']} images x {ev.iw_samples} samples "
          f"on {device} ({precision_used(precision, device)}) in {time.perf_counter() - started:.1f} s")
    if cfg.kind in SCORES_FACTORS:
        started = time.perf_counter()
        metrics.update(disentanglement_scores(cfg, model, lmdb_dir, device))
        print(f"[sdn] {cfg.name}: disentanglement scores in {time.perf_counter() - started:.1f} s")
    # last, so that its draws leave every figure above as it was
    with precision_context(precision, device):
        metrics.update(dot_pattern(cfg, model, data.dataset("val"), device))
    metrics = _rounded(metrics)
    write_json_atomic(metrics, out_dir / "eval.json")
    return metrics


DOT_PATTERN_IMAGES = 256


@torch.no_grad()
def dot_pattern(cfg: ExperimentConfig, model, data, device: torch.device) -> dict[str, float]:
    """The share of power at the 2-pixel period (`spectrum.nyquist_share`) of the pictures the
    sample grids show (the observation mode at the first sampling temperature) and of validation
    images, each averaged over `DOT_PATTERN_IMAGES` images with its standard error: samples far
    above the data carry a dot pattern the data do not."""
    n = min(DOT_PATTERN_IMAGES, len(data))
    size = cfg.evaluate.batch_size
    drawn = [
        pictures.sample_grid(model, min(size, n - start), cfg.sample.temperatures[0]).float()
        for start in range(0, n, size)
    ]
    samples = nyquist_share(torch.cat(drawn)).cpu()
    real = nyquist_share(torch.stack([data[i][0] for i in range(n)]).float() / 255.0)
    return {
        "nyquist_share_samples": samples.mean().item(),
        "nyquist_share_samples_se": (samples.std() / math.sqrt(n)).item(),
        "nyquist_share_data": real.mean().item(),
        "nyquist_share_data_se": (real.std() / math.sqrt(n)).item(),
    }


@torch.no_grad()
def disentanglement_scores(
    cfg: ExperimentConfig, model, lmdb_dir: Path, device: torch.device | str = "cpu"
) -> dict[str, float | int]:
    """Encode labelled images (posterior means) and score the codes against their factors, each
    score with its standard error (see `disentanglement.scores_with_errors`)."""
    from sdn.evaluation import disentanglement as metrics

    ev = cfg.evaluate
    data = ImageDataModule.for_experiment(cfg, lmdb_dir, splits=("train",)).dataset("train")
    count = len(data) if ev.disentanglement_points is None else min(len(data), ev.disentanglement_points)
    generator = torch.Generator().manual_seed(cfg.seed)
    indices = torch.randperm(len(data), generator=generator)[:count].tolist()
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=ev.batch_size)
    codes, factors = [], []
    for images, labels in tqdm(loader, desc="encode", unit="batch", disable=not cfg.trainer.progress_bar):
        with precision_context(cfg.trainer.precision, torch.device(device)):
            codes.append(model.encode(model.obs.preprocess(images.to(device))).float().cpu().numpy())
        factors.append(labels.numpy())
    scores = metrics.scores_with_errors(
        np.concatenate(codes).astype(np.float64),
        np.concatenate(factors).astype(np.int64),
        repeats=ev.disentanglement_repeats,
        seed=cfg.seed,
        beta_vae_train=ev.beta_vae_train,
        beta_vae_eval=ev.beta_vae_eval,
        factor_vae_train=ev.factor_vae_train,
        factor_vae_eval=ev.factor_vae_eval,
        mig_points=None if ev.mig_points is None else min(ev.mig_points, count),
        dci_train=ev.dci_train,
        dci_test=ev.dci_test,
        n_jobs=-1,  # independent seeded draws: the same scores on any number of cores
        progress=cfg.trainer.progress_bar,
    )
    return {**scores, "disentanglement_images": count}


# --------------------------------------------------------------------------------------------
# Pictures


@torch.no_grad()
def sample_experiment(cfg: ExperimentConfig, lmdb_dir: Path, ckpt_dir: Path, out_dir: Path) -> list[Path]:
    """Sample grids at each temperature (the first is the run's sampling temperature), plus
    interpolations, neighbourhoods and nearest training images (density) or reconstructions and
    traversals (β-VAE).

    The pictures are built in a temporary folder beside `out_dir` and swapped in when all are
    written, so `out_dir` always holds exactly one run's pictures: a run that fails or is killed
    midway leaves the previous ones, and grids of temperatures no longer configured go."""
    started = time.perf_counter()
    model, data, device = _load(cfg, lmdb_dir, ckpt_dir)
    first = next(iter(DataLoader(data.dataset("val"), batch_size=max(4, cfg.sample.grid))))[0]
    pictures_to_draw = _pictures_to_draw(cfg, model, model.obs.preprocess(first.to(device)), data)
    scale = pictures.upscale_factor(cfg.model.image_size)

    built = temp_dir(out_dir)  # after undoing what a killed run left beside out_dir
    try:
        progress = tqdm(pictures_to_draw, desc="sample", unit="picture", disable=not cfg.trainer.progress_bar)
        for file_name, nrow, title, draw in progress:
            with precision_context(cfg.trainer.precision, device):
                images = draw()
            pictures.save_grid(images, built / file_name, nrow, title, scale)
        replace_dir(built, out_dir)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    print(f"[sdn] {cfg.name}: drew {len(pictures_to_draw)} pictures on {device} "
          f"({precision_used(cfg.trainer.precision, device)}) in {time.perf_counter() - started:.1f} s")
    return [out_dir / file_name for file_name, *_ in pictures_to_draw]


def _pictures_to_draw(
    cfg: ExperimentConfig, model, x: torch.Tensor, data: ImageDataModule
) -> list[tuple[str, int, str, Callable[[], torch.Tensor]]]:
    """(file name, images per row, title, how to draw it) for each picture, in drawing order: the
    sample grids, then the pictures `PICTURES` names for the kind of model; `x` holds validation
    images. Titles name the experiment and what the picture shows."""
    sc = cfg.sample
    n = sc.grid
    name = cfg.name

    def interpolation(layers: int) -> torch.Tensor:
        pairs = (x[0:2], x[2:4])
        return torch.cat([
            pictures.interpolate_density(
                model, pair, layers, sc.interpolation_steps, sc.interpolation_temperature
            )
            for pair in pairs
        ])

    pictures_to_draw: list[tuple[str, int, str, Callable[[], torch.Tensor]]] = [
        (
            f"samples_t{t:g}.png", n, f"{name} · samples, T = {t:g}",
            lambda t=t: pictures.sample_grid(model, n * n, t),
        )
        for t in sc.temperatures
    ]
    # the other pictures, which show what the model learnt (`PICTURES`)
    kept = f"{name} · top {sc.neighbourhood_layers} layers kept, T = {sc.neighbourhood_temperature:g}"
    drawn_for = {
        "interpolations": [
            (
                f"interpolation_l{k}.png", sc.interpolation_steps + 2,
                f"{name} · interpolation, top {k + 1} layers", lambda k=k: interpolation(k),
            )
            for k in sc.interpolation_layers
        ],
        "neighbourhood": [
            ("neighbourhood.png", n, kept, lambda: pictures.neighbourhood(
                model, x[:4], sc.neighbourhood_layers, n - 1, sc.neighbourhood_temperature
            )),
        ],
        "nearest_train": [
            (
                "nearest_train.png", sc.nearest_k + 1, f"{name} · sample, nearest training images",
                lambda: _nearest(cfg, model, data.dataset("train")),
            ),
        ],
        "reconstructions": [
            (
                "reconstructions.png", 2 * int(math.sqrt(n)), f"{name} · inputs and reconstructions",
                lambda: pictures.reconstructions(model, x[:n]),
            ),
        ],
        "traversals": [
            (
                "traversals.png", 8, f"{name} · latent traversals, -3 to 3",
                lambda: pictures.traversals(model, x[:1]),
            ),
        ],
    }
    for picture in PICTURES[cfg.kind]:
        pictures_to_draw += drawn_for[picture]
    return pictures_to_draw


def _nearest(cfg: ExperimentConfig, model, train: Dataset) -> torch.Tensor:
    """Rows: a sample at the run's sampling temperature, then its nearest training images (an
    overfitting check)."""
    device = next(model.parameters()).device
    loader = DataLoader(train, batch_size=2048)

    def chunks():
        for images, *_ in tqdm(loader, desc="nearest", unit="chunk", disable=not cfg.trainer.progress_bar):
            yield model.obs.postprocess(model.obs.preprocess(images.to(device)))

    samples = pictures.sample_grid(model, cfg.sample.nearest_samples, cfg.sample.temperatures[0])
    indices, _ = pictures.nearest_training_images(samples, chunks(), cfg.sample.nearest_k)
    rows = []
    for sample, idx in zip(samples, indices, strict=True):
        neighbours = torch.stack([train[int(i)][0] for i in idx]).to(device)
        rows.append(torch.cat([sample[None], model.obs.postprocess(model.obs.preprocess(neighbours))]))
    return torch.cat(rows)
