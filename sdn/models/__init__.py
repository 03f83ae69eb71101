"""The two VAEs of the paper as plain `nn.Module`s: `build_model`, the model an experiment trains,
and `prepare_model`, the release's initialisation and weight norm.

- `density`: the SDN-VAE; `disentanglement`: the SDN β-VAE;
- `latents`: posteriors and priors; `observations`: the observation models; `distributions`: what
  both share, and `bits_per_dim`.

Their hyper-parameters live in the torch-free `sdn.hyperparameters`, which the configuration
reads without importing this package. `build_model` and `prepare_model` read only the fields they
use (`kind` and `model` of an experiment, `init` and `weight_norm` of its training section), so
this package needs nothing from `sdn.config`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from sdn.hyperparameters import DensityConfig, DisentanglementConfig
from sdn.models.density import DensityVAE
from sdn.models.disentanglement import DisentanglementVAE


class ModelChoice(Protocol):
    """What `build_model` reads of an experiment's configuration."""

    kind: str
    model: DensityConfig | DisentanglementConfig


class InitChoice(Protocol):
    """What `prepare_model` reads of an experiment's training section."""

    init: str
    weight_norm: bool


def build_model(cfg: ModelChoice) -> nn.Module:
    """The plain `nn.Module` an experiment trains."""
    if cfg.kind == "density":
        return DensityVAE(cfg.model)
    return DisentanglementVAE(cfg.model)


def prepare_model(model: nn.Module, train: InitChoice) -> nn.Module:
    """The release's initialisation, then weight normalisation on every conv (as released).

    `train.init == "orthogonal"`: conv weights orthogonal, `Linear` weights N(0, 0.02); biases
    keep PyTorch's default init. `train.weight_norm`: one gain g per output channel and the
    direction v of each conv weight, which for `ConvTranspose2d` (weight shape (in, out, k, k))
    means along dim 1. The release's density models are normalised, its β-VAE is not.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if train.init == "orthogonal":
        for conv in convs:
            nn.init.orthogonal_(conv.weight)
        for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(linear.weight, 0.0, 0.02)
    if train.weight_norm:
        for conv in convs:
            output_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
            torch.nn.utils.parametrizations.weight_norm(conv, dim=output_dim)
    return model
