"""What the models' probability distributions share: every distribution reads its parameters from
a feature map produced by a network, so parameters arrive as channels of a (B, P, H, W) tensor.
Latent log-densities are returned elementwise (same shape as the latent map) so that the caller can
sum per image or per layer; observation log-likelihoods are returned per image, shape (B,).

The latents are in `sdn.models.latents`, the observation models in `sdn.models.observations`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def bits_per_dim(nats: Tensor | float, dims: int, images: float = 1.0) -> Tensor | float:
    """A negative log-likelihood in nats, summed over `images` images of `dims` values each
    (C·H·W), as bits per dimension: nats / (dims · images · ln 2)."""
    return nats / (dims * math.log(2.0) * images)


def at_least_float32(tensor: Tensor) -> Tensor:
    """Upcast half-precision tensors: log-likelihood tails underflow in 16 bits."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def check_temperature(temperature: float) -> None:
    """Refuse a negative sampling temperature."""
    if temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0, got {temperature}")


def unknown_name(knob: str, name: str, choices: Iterable[str]) -> ValueError:
    """The error for a distribution name that `knob` (`post_model`, ...) does not offer."""
    return ValueError(f"unknown {knob} {name!r}; choose one of: {', '.join(choices)}")
