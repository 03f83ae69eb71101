"""A dot-pattern detector: how much of an image's detail sits at the 2-pixel period.

A stride-2 transposed convolution computes the pixels of each parity (even/odd row, even/odd
column) with different kernel taps, so an undertrained generator can give them different values:
a regular dot or stripe pattern of period 2. In the 2-D Fourier spectrum that pattern lies on the
Nyquist row and column (frequency 1/2 cycle per pixel); natural images put little power there.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nyquist_share(images: Tensor) -> Tensor:
    """Per image (N, C, H, W), the share of its spectral power (mean removed per channel) that
    lies at the 2-pixel period along either axis, averaged over channels: 0 for an image without
    any 2-pixel pattern, 1 for a pure one (a checkerboard or 1-pixel stripes). A flat image has no
    power at all and scores 0. H and W must be even."""
    if images.dim() != 4 or images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(
            f"nyquist_share expects (N, C, H, W) images with even H and W, got {tuple(images.shape)}"
        )
    x = images.double()
    power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    at_nyquist = power[..., h, :].sum(-1) + power[..., :, w].sum(-1) - power[..., h, w]
    total = power.sum(dim=(-2, -1))
    share = torch.where(total > 0, at_nyquist / total.clamp(min=1e-30), torch.zeros_like(total))
    return share.mean(dim=1).float()
