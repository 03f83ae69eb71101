"""The model an experiment trains, from its configuration (also reachable as `sdn.config.build_model`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from sdn.models.density import DensityVAE
from sdn.models.disentanglement import DisentanglementVAE

if TYPE_CHECKING:
    from sdn.config import ExperimentConfig


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The plain `nn.Module` an experiment trains."""
    if cfg.kind == "density":
        return DensityVAE(cfg.model)
    return DisentanglementVAE(cfg.model)
