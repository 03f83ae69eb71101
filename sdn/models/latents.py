"""Latent posteriors and priors of the SDN-VAE (docs/maths.md#latents).

* ``IsoGaussianPosterior`` / ``IsoGaussianPrior``: channels ``[mean (z), log-variance (z)]``.
* ``IAFPosterior``: channels ``[mean (z), log-variance (z), context (c)]`` with
  ``c = max(100 // z, 1) * z``, followed by one inverse-autoregressive flow step whose
  autoregressive network uses spatially masked (raster order) convolutions.

Each class carries the name the release's hyper-parameters give it (``post_model``,
``prior_model``); ``POSTERIOR_MODELS`` and ``PRIOR_MODELS`` map those names to the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdn.models.distributions import LOG_2PI, at_least_float32, check_temperature, unknown_name


def _gaussian_log_prob(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (logvar + LOG_2PI + (z - mean) ** 2 * torch.exp(-logvar))


class IsoGaussianPosterior(nn.Module):
    """Diagonal Gaussian posterior; params channels are ``[mean (z), log-variance (z)]``."""

    name = "IsoGaussian"

    def __init__(self, z_size: int) -> None:
        super().__init__()
        self.z_size = z_size
        self.num_params = 2 * z_size

    def forward(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised sample ``z`` and elementwise ``log q(z)``."""
        mean, logvar = at_least_float32(params).chunk(2, dim=1)
        eps = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * eps
        # Written in terms of eps: exact and cheaper than re-standardising z.
        log_q = -0.5 * (logvar + LOG_2PI + eps**2)
        return z, log_q

    def mode(self, params: Tensor) -> Tensor:
        """The posterior mean."""
        return params.chunk(2, dim=1)[0]


class MaskedConv2d(nn.Conv2d):
    """'Same' convolution whose kernel sees only raster-order earlier positions (PixelCNN).

    Type ``"A"`` hides the centre and everything after it; type ``"B"`` hides only what comes
    after the centre. There is no masking across channels. The mask is applied to
    ``self.weight`` in every forward (not once to the data), so orthogonal initialisation and
    weight normalisation applied later to this module keep the autoregressive property.

    As released, the masked taps are zeroed in the weight's value only: the convolution's
    gradient reaches them too, and through them weight normalisation's g and v (the release
    zeroes ``weight.data`` in place, which autograd does not see). The output, and the gradient
    with respect to the input, are those of the masked kernel.
    """

    mask: Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(kernel_size, kernel_size)
        mask[centre, centre + (mask_type == "B") :] = 0
        mask[centre + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        # value weight * mask, gradient with respect to `weight` unmasked (straight through)
        masked = weight - (weight * (1 - self.mask)).detach()
        return F.conv2d(x, masked, self.bias, self.stride, self.padding)


class IAFPosterior(nn.Module):
    """Gaussian posterior followed by one inverse autoregressive flow step (IAF-VAE).

    Params channels are ``[mean (z), log-variance (z), context (c)]``,
    ``c = max(100 // z, 1) * z``. With ``z0 = mean + sigma * eps`` and
    ``(m, s) = 0.1 * ARNet(z0, context)``, the output is ``z = (z0 - m) / exp(s)`` and
    ``log q(z) = log N(z0; mean, sigma) + s``. ARNet's masks make ``(m, s)`` at a position
    depend only on ``z0`` at raster-order earlier positions, so the Jacobian is triangular.
    """

    name = "IAF"

    def __init__(self, z_size: int) -> None:
        super().__init__()
        self.z_size = z_size
        self.context_size = max(100 // z_size, 1) * z_size
        self.num_params = 2 * z_size + self.context_size
        self.ar_input = MaskedConv2d(z_size, self.context_size, 3, "A")
        self.ar_hidden = MaskedConv2d(self.context_size, self.context_size, 3, "B")
        self.ar_output = MaskedConv2d(self.context_size, 2 * z_size, 3, "B")

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return params.split([self.z_size, self.z_size, self.context_size], dim=1)

    def _flow(self, z0: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.ar_input(z0) + context
        hidden = self.ar_hidden(F.elu(hidden))
        shift, log_scale = (0.1 * self.ar_output(F.elu(hidden))).chunk(2, dim=1)
        return (z0 - shift) * torch.exp(-log_scale), log_scale

    def forward(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised sample ``z`` after the flow and its elementwise ``log q(z)``."""
        mean, logvar, context = self._split(at_least_float32(params))
        eps = torch.randn_like(mean)
        z, log_scale = self._flow(mean + torch.exp(0.5 * logvar) * eps, context)
        log_q = -0.5 * (logvar + LOG_2PI + eps**2) + log_scale
        return z, log_q

    def mode(self, params: Tensor) -> Tensor:
        """The flow applied to the Gaussian mean (``eps = 0``)."""
        mean, _, context = self._split(params)
        return self._flow(mean, context)[0]


class IsoGaussianPrior(nn.Module):
    """Diagonal Gaussian prior; params channels are ``[mean (z), log-variance (z)]``."""

    name = "IsoGaussian"

    def __init__(self, z_size: int) -> None:
        super().__init__()
        self.z_size = z_size
        self.num_params = 2 * z_size

    def log_prob(self, z: Tensor, params: Tensor) -> Tensor:
        """Elementwise ``log p(z)``."""
        mean, logvar = at_least_float32(params).chunk(2, dim=1)
        return _gaussian_log_prob(at_least_float32(z), mean, logvar)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        """Draw with standard deviation ``temperature * sigma``; ``temperature=0`` is the mean."""
        check_temperature(temperature)
        mean, logvar = params.chunk(2, dim=1)
        if temperature == 0:
            return mean.clone()
        return mean + temperature * torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def mode(self, params: Tensor) -> Tensor:
        """The prior mean."""
        return params.chunk(2, dim=1)[0]


# The choices of `post_model` and `prior_model`, in the order error messages list them.
POSTERIOR_MODELS = {cls.name: cls for cls in (IAFPosterior, IsoGaussianPosterior)}
PRIOR_MODELS = {cls.name: cls for cls in (IsoGaussianPrior,)}


def build_posterior(name: str, z_size: int) -> nn.Module:
    """The posterior named by ``post_model``: ``"IAF"`` or ``"IsoGaussian"``."""
    if name not in POSTERIOR_MODELS:
        raise unknown_name("post_model", name, POSTERIOR_MODELS)
    return POSTERIOR_MODELS[name](z_size)


def build_prior(name: str, z_size: int) -> nn.Module:
    """The prior named by ``prior_model``: ``"IsoGaussian"``."""
    if name not in PRIOR_MODELS:
        raise unknown_name("prior_model", name, PRIOR_MODELS)
    return PRIOR_MODELS[name](z_size)
