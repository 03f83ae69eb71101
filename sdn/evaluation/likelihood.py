"""Density evaluation: −ELBO, KL and importance-weighted NLL in bits/dim.

The model is seen only through ``elbo_fn(x)``: a single-sample ELBO per image (natural log,
``log p(x|z) − KL`` without free bits, a fresh latent sample on every call). It returns
either a tensor of shape (B,) or a dict ``{"elbo": (B,), "kl": (B,)}``; with the dict, the
KL term is reported as well.

Importance-weighted NLL with K samples (Burda et al., 2016; docs/maths.md#iw-nll):
``log p(x) ≈ logsumexp_k ELBO_k − log K``, a lower bound on ``log p(x)`` that tightens as K
grows and equals the ELBO at K = 1.

As the release's ``evaluate.py`` computes them: every importance sample of an image is a full
forward pass of its own (a row of the model's input batch: the K·B rows are only cut into
chunks so that several rows share one call), and the −ELBO is a single-sample estimate per
image. The release draws that sample in a separate pass; here it is the first of the K
samples, which has the same distribution and costs nothing extra.
"""

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from sdn.models.distributions import bits_per_dim

ElboOutput = Tensor | dict[str, Tensor]
ElboFn = Callable[[Tensor], ElboOutput]


def _split_elbo_output(output: ElboOutput, num_rows: int) -> tuple[Tensor, Tensor | None]:
    """Return (elbo, kl or None) as float64 vectors, checking their shapes."""
    if isinstance(output, dict):
        if "elbo" not in output:
            raise ValueError(
                f"elbo_fn returned a dict with keys {sorted(output)}; it needs an 'elbo' key "
                "(and optionally 'kl')."
            )
        elbo, kl = output["elbo"], output.get("kl")
    else:
        elbo, kl = output, None
    for name, value in (("elbo", elbo), ("kl", kl)):
        if value is not None and tuple(value.shape) != (num_rows,):
            raise ValueError(
                f"elbo_fn must return one {name} value per image: expected shape ({num_rows},) "
                f"for {num_rows} input images, got {tuple(value.shape)}. Sum over all but "
                "the batch dimension."
            )
    # float64 so that logsumexp over K ≈ 1000 ELBOs of size ~1e4 nats loses no precision.
    elbo = elbo.detach().to("cpu", torch.float64)
    kl = None if kl is None else kl.detach().to("cpu", torch.float64)
    return elbo, kl


def _check_sampling_args(num_samples: int, chunk_size: int) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


@torch.no_grad()
def _importance_sample(
    elbo_fn: ElboFn, x: Tensor, num_samples: int, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Stream K single-sample ELBOs per image; return (IW log-likelihood, the first sample's
    ELBO, the first sample's KL or None).

    The K·B (sample, image) pairs are visited in one fixed, sample-major order (row
    r = k·B + b) and cut into consecutive chunks of at most ``chunk_size`` rows, one
    ``elbo_fn`` call each. The order does not depend on ``chunk_size``, so a model that draws
    its noise row by row sees the same noise for every chunking.
    """
    _check_sampling_args(num_samples, chunk_size)
    batch = x.shape[0]
    total_rows = num_samples * batch
    log_sum = torch.full((batch,), -math.inf, dtype=torch.float64)
    first_elbo = torch.zeros(batch, dtype=torch.float64)
    first_kl: Tensor | None = None
    for start in range(0, total_rows, chunk_size):
        end = min(start + chunk_size, total_rows)
        images = torch.arange(start, end) % batch
        elbo, kl = _split_elbo_output(elbo_fn(x[images.to(x.device)]), end - start)
        # Lay the chunk onto whole sample rows of the (K, B) grid, padding with log 0 = −inf,
        # so one logsumexp over samples gives every image's share of this chunk.
        first_sample = start // batch
        last_sample = (end - 1) // batch
        num_grid_rows = (last_sample - first_sample + 1) * batch
        grid = torch.full((num_grid_rows,), -math.inf, dtype=torch.float64)
        grid[start - first_sample * batch : end - first_sample * batch] = elbo
        log_sum = torch.logaddexp(log_sum, grid.view(-1, batch).logsumexp(dim=0))
        if start < batch:  # rows 0..B−1 are every image's first sample
            first = slice(start, min(end, batch))
            first_elbo[first] = elbo[: first.stop - start]
            if kl is not None:
                if first_kl is None:
                    first_kl = torch.zeros(batch, dtype=torch.float64)
                first_kl[first] = kl[: first.stop - start]
    return log_sum - math.log(num_samples), first_elbo, first_kl


def importance_weighted_log_likelihood(
    elbo_fn: ElboFn, x: Tensor, num_samples: int, chunk_size: int
) -> Tensor:
    """Importance-weighted estimate of log p(x) per image, shape (B,), float64, in nats.

    ``logsumexp_k ELBO_k − log K`` over ``num_samples`` = K fresh single-sample ELBOs per
    image. Each ``elbo_fn`` call sees at most ``chunk_size`` rows (copies of images of
    ``x``), and the logsumexp is accumulated across calls, so memory is bounded for any K.
    """
    log_likelihood, _, _ = _importance_sample(elbo_fn, x, num_samples, chunk_size)
    return log_likelihood


def _mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean over images and its standard error (sample std / √n)."""
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def evaluate_density(
    elbo_fn: ElboFn,
    batches: Iterable[Tensor],
    num_samples: int,
    chunk_size: int,
    dims_per_image: int,
    progress: bool = False,
) -> dict[str, float | int]:
    """−ELBO, importance-weighted NLL (and KL) in bits/dim over all images of ``batches``.

    Each image gets ``num_samples`` = K single-sample ELBOs from ``elbo_fn`` in chunks of at
    most ``chunk_size`` rows. ``nll_bpd`` is −(logsumexp_k ELBO_k − log K); ``elbo_bpd`` is
    −ELBO from one sample per image (the first of the K), as the release reports it: an unbiased
    estimate of −ELBO, whose mean over images is above ``nll_bpd`` up to sampling noise;
    ``kl_bpd`` (only when ``elbo_fn`` returns a dict with "kl") is that sample's KL. Bits/dim =
    nats / (``dims_per_image`` · ln 2), e.g. dims_per_image = C·H·W. Every value comes with its
    standard error over images (``*_se``: sample std / √n, which includes the sampling noise of
    the estimators), so at least two images are needed. ``batches`` yields image tensors;
    ``elbo_fn`` gets (repeated) rows of them on their device, so move them to the model's device
    in the iterable or in ``elbo_fn``. Returns plain floats and ints, ready for ``json.dump``.
    """
    _check_sampling_args(num_samples, chunk_size)
    if dims_per_image < 1:
        raise ValueError(f"dims_per_image must be >= 1 (C·H·W), got {dims_per_image}.")
    log_likelihoods, elbos, kls = [], [], []
    for x in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"batches must yield image tensors, got {type(x).__name__}; "
                "map (image, label) pairs to images first."
            )
        log_likelihood, elbo, kl = _importance_sample(elbo_fn, x, num_samples, chunk_size)
        log_likelihoods.append(log_likelihood)
        elbos.append(elbo)
        if kl is not None:
            kls.append(kl)
    num_images = sum(v.numel() for v in elbos)
    if num_images < 2:
        raise ValueError(
            f"evaluate_density needs at least 2 images for a standard error, got {num_images}."
        )
    if kls and len(kls) != len(elbos):
        raise ValueError("elbo_fn returned 'kl' for some batches but not for others.")

    costs_in_nats = {"elbo_bpd": -torch.cat(elbos), "nll_bpd": -torch.cat(log_likelihoods)}
    if kls:
        costs_in_nats["kl_bpd"] = torch.cat(kls)
    results: dict[str, float | int] = {}
    for key, nats in costs_in_nats.items():
        mean, se = _mean_and_se(bits_per_dim(nats, dims_per_image))
        results[key] = mean
        results[f"{key}_se"] = se
    results["num_images"] = num_images
    results["num_samples"] = num_samples
    return results
