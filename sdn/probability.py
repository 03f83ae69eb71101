"""Probability models of the SDN-VAEs: latent posteriors and priors, and observation models.

Every distribution reads its parameters from a feature map produced by a network, so
parameters arrive as channels of a (B, P, H, W) tensor. Latent log-densities are returned
elementwise (same shape as the latent map) so that the caller can sum per image or per
layer; observation log-likelihoods are returned per image, shape (B,).

Latents (docs/maths.md#latents):

* ``IsoGaussianPosterior`` / ``IsoGaussianPrior``: channels ``[mean (z), log-variance (z)]``.
* ``IAFPosterior``: channels ``[mean (z), log-variance (z), context (c)]`` with
  ``c = max(100 // z, 1) * z``, followed by one inverse-autoregressive flow step whose
  autoregressive network uses spatially masked (raster order) convolutions.

Observations (images are uint8 in 0..255; ``preprocess`` maps them to the model's data space):

* ``DiscretizedMixLogistic`` (DML, PixelCNN++): data in [-1, 1].
* ``DiscretizedLogistic`` (DL): data in [-0.5, 0.5], one learned global log-scale, as released
  (not exactly normalised).
* ``Bernoulli``: data in {0, 1}.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdn.models.configs import OBSERVATIONS, POSTERIORS, PRIORS

LOG_2PI = math.log(2.0 * math.pi)


def bits_per_dim(nats: Tensor | float, dims: int, images: float = 1.0) -> Tensor | float:
    """A negative log-likelihood in nats, summed over `images` images of `dims` values each
    (C·H·W), as bits per dimension: nats / (dims · images · ln 2)."""
    return nats / (dims * math.log(2.0) * images)


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Upcast half-precision tensors: log-likelihood tails underflow in 16 bits."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0, got {temperature}")


def _check_nbits(nbits: int) -> None:
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be an integer in 1..8, got {nbits}")


def _quantise(images: Tensor, nbits: int) -> Tensor:
    """uint8 images in 0..255 -> integer levels 0..2^nbits - 1 (as float32)."""
    if images.dtype.is_floating_point or images.dtype == torch.bool:
        raise TypeError(
            f"preprocess expects integer images in 0..255 (uint8), got {images.dtype}; "
            "pass the raw pixels, not a normalised tensor"
        )
    return torch.div(images.long(), 2 ** (8 - nbits), rounding_mode="floor").float()


def _logistic_noise(like: Tensor) -> Tensor:
    """Standard logistic noise; the uniform is kept off 0 and 1 so the noise is finite."""
    uniform = torch.rand_like(like).clamp(1e-5, 1.0 - 1e-5)
    return torch.log(uniform) - torch.log1p(-uniform)


def _gaussian_log_prob(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (logvar + LOG_2PI + (z - mean) ** 2 * torch.exp(-logvar))


# --------------------------------------------------------------------------------------------
# Latent distributions
# --------------------------------------------------------------------------------------------


class IsoGaussianPosterior(nn.Module):
    """Diagonal Gaussian posterior; params channels are ``[mean (z), log-variance (z)]``."""

    def __init__(self, z_size: int) -> None:
        super().__init__()
        self.z_size = z_size
        self.num_params = 2 * z_size

    def forward(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised sample ``z`` and elementwise ``log q(z)``."""
        mean, logvar = _at_least_float32(params).chunk(2, dim=1)
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
        mean, logvar, context = self._split(_at_least_float32(params))
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

    def __init__(self, z_size: int) -> None:
        super().__init__()
        self.z_size = z_size
        self.num_params = 2 * z_size

    def log_prob(self, z: Tensor, params: Tensor) -> Tensor:
        """Elementwise ``log p(z)``."""
        mean, logvar = _at_least_float32(params).chunk(2, dim=1)
        return _gaussian_log_prob(_at_least_float32(z), mean, logvar)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        """Draw with standard deviation ``temperature * sigma``; ``temperature=0`` is the mean."""
        _check_temperature(temperature)
        mean, logvar = params.chunk(2, dim=1)
        if temperature == 0:
            return mean.clone()
        return mean + temperature * torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def mode(self, params: Tensor) -> Tensor:
        """The prior mean."""
        return params.chunk(2, dim=1)[0]


# --------------------------------------------------------------------------------------------
# Observation models
# --------------------------------------------------------------------------------------------


class ObservationModel(nn.Module, ABC):
    """p(x | params) for an image ``x`` in the model's data space (see ``preprocess``)."""

    @abstractmethod
    def num_params(self, channels: int) -> int:
        """Channels of decoder output this model consumes for a ``channels``-channel image."""

    @abstractmethod
    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) in 0..255 -> float32 data on this model's grid."""

    @abstractmethod
    def postprocess(self, x: Tensor) -> Tensor:
        """Data space -> float in [0, 1] for saving images."""

    @abstractmethod
    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``log p(x | params)`` summed over C, H, W: shape (B,)."""

    @abstractmethod
    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        """A draw in data space on the quantisation grid; ``temperature=0`` gives ``mode``."""

    @abstractmethod
    def mode(self, params: Tensor) -> Tensor:
        """A deterministic most likely image in data space, on the grid."""


class DiscretizedMixLogistic(ObservationModel):
    """Discretised mixture of logistics (PixelCNN++), with RGB channel coupling.

    Data: ``x = level / (2^nbits - 1) * 2 - 1`` for ``level = floor(pixel / 2^(8 - nbits))``;
    each value owns the bin ``x +- 1 / (2^nbits - 1)``, the end bins extend to infinity.

    Parameter layout for M components (matching the original release), per pixel:
    M mixture logits, then for each channel in order its M means, M log-scales (clamped at
    -7) and, for RGB only, M coefficients (through tanh). RGB: ``P = M + 3*3*M`` and the
    means are coupled autoregressively, ``mean_g += c0 * x_r``, ``mean_b += c1 * x_r +
    c2 * x_g``. Any other channel count has no coupling and no coefficients:
    ``P = M + 2*C*M``.

    Sampling and the mode as released: the component is drawn from ``softmax(logits)``
    (Gumbel-max; the temperature does not sharpen it), the logistic scale is multiplied by the
    temperature ``T``, and each channel is coupled to the earlier channels' continuous values
    clamped to [-1, 1]; only the finished image is snapped to the grid. The mode takes the most
    likely component's means, coupled the same way. ``T = 0`` gives the mode.
    """

    def __init__(self, channels: int = 3, mix_components: int = 10, nbits: int = 8) -> None:
        super().__init__()
        _check_nbits(nbits)
        if mix_components < 1:
            raise ValueError(f"mix_components must be >= 1, got {mix_components}")
        self.channels = channels
        self.mix_components = mix_components
        self.nbits = nbits
        self.max_level = 2**nbits - 1
        self.coupled = channels == 3
        self.half_bin = 1.0 / self.max_level

    def num_params(self, channels: int) -> int:
        if channels != self.channels:
            raise ValueError(f"this DML was built for {self.channels} channels, asked about {channels}")
        per_channel = 3 if self.coupled else 2
        return self.mix_components * (1 + per_channel * channels)

    def preprocess(self, images: Tensor) -> Tensor:
        return self._to_data(_quantise(images, self.nbits))

    def postprocess(self, x: Tensor) -> Tensor:
        return self._to_levels(x) / self.max_level

    def _to_data(self, levels: Tensor) -> Tensor:
        return levels / self.max_level * 2 - 1

    def _to_levels(self, x: Tensor) -> Tensor:
        return torch.round((x + 1) / 2 * self.max_level).clamp(0, self.max_level)

    def _unpack(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """-> logits (B, M, H, W); means, log-scales, coefficients (B, C, M, H, W)."""
        batch, num_params, height, width = params.shape
        expected = self.num_params(self.channels)
        if num_params != expected:
            raise ValueError(f"DML expects {expected} parameter channels, got {num_params}")
        mix = self.mix_components
        per_channel = params[:, mix:].reshape(batch, self.channels, -1, mix, height, width)
        means = per_channel[:, :, 0]
        log_scales = per_channel[:, :, 1].clamp(min=-7.0)
        coeffs = torch.tanh(per_channel[:, :, 2]) if self.coupled else None
        return params[:, :mix], means, log_scales, coeffs

    @staticmethod
    def _couple(channel: int, mean: Tensor, coeffs: Tensor | None, earlier: list[Tensor]) -> Tensor:
        """Shift channel ``channel``'s mean by the values of the channels before it."""
        if coeffs is None:
            return mean
        for index, value in enumerate(earlier):
            # RGB: coefficient 0 for (g, r), 1 for (b, r), 2 for (b, g).
            mean = mean + coeffs[:, channel * (channel - 1) // 2 + index] * value
        return mean

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        x, params = _at_least_float32(x), _at_least_float32(params)
        logits, means, log_scales, coeffs = self._unpack(params)
        values = [x[:, c].unsqueeze(1) for c in range(self.channels)]  # (B, 1, H, W) each
        means = torch.stack(
            [self._couple(c, means[:, c], coeffs, values[:c]) for c in range(self.channels)], 1
        )
        x = x.unsqueeze(2)
        centred = x - means
        inv_scale = torch.exp(-log_scales)
        plus_in = inv_scale * (centred + self.half_bin)
        min_in = inv_scale * (centred - self.half_bin)
        mid_in = inv_scale * centred
        log_cdf_plus = -F.softplus(-plus_in)  # lowest bin: P(X <= upper edge)
        log_one_minus_cdf_min = -F.softplus(min_in)  # highest bin: P(X >= lower edge)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        # When the bin mass underflows, use density at the centre times the bin width.
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        log_bin_tiny = log_pdf_mid + math.log(2 * self.half_bin)
        log_bin = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_bin_tiny)
        log_probs = torch.where(
            x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin)
        )
        log_mix = log_probs.sum(dim=1) + F.log_softmax(logits, dim=1)  # (B, M, H, W)
        return torch.logsumexp(log_mix, dim=1).flatten(1).sum(dim=1)

    def _draw(self, params: Tensor, temperature: float) -> Tensor:
        logits, means, log_scales, coeffs = self._unpack(params)
        if temperature > 0:
            uniform = torch.rand_like(logits).clamp(1e-5, 1.0 - 1e-5)
            logits = logits - torch.log(-torch.log(uniform))  # Gumbel-max: a draw from softmax(logits)
        component = logits.argmax(dim=1)[:, None, None]  # (B, 1, 1, H, W)

        def pick(per_component: Tensor) -> Tensor:
            index = component.expand(-1, per_component.shape[1], -1, -1, -1)
            return per_component.gather(2, index).squeeze(2)  # (B, C, H, W)

        mean = pick(means)
        if temperature > 0:
            mean = mean + temperature * torch.exp(pick(log_scales)) * _logistic_noise(mean)
        coeffs = pick(coeffs) if coeffs is not None else None
        drawn: list[Tensor] = []
        for channel in range(self.channels):
            drawn.append(self._couple(channel, mean[:, channel], coeffs, drawn).clamp(-1.0, 1.0))
        return self._to_data(self._to_levels(torch.stack(drawn, dim=1)))

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        _check_temperature(temperature)
        return self._draw(params, temperature)

    def mode(self, params: Tensor) -> Tensor:
        """Centre of the most likely component, channels coupled, snapped to the grid."""
        return self._draw(params, 0.0)


class DiscretizedLogistic(ObservationModel):
    """One discretised logistic per sub-pixel with a single learned global log-scale, as released.

    Data: ``x = level / (2^nbits - 1) - 0.5`` for ``level = floor(pixel / 2^(8 - nbits))``, so
    [-0.5, 0.5]. Params are the means, one channel per image channel, clamped to
    ``±(0.5 - 1/512)``. With ``s = exp(log_scale)`` a value scores
    ``log(σ((x - μ + 1/2^nbits) / s) - σ((x - μ) / s) + 1e-7)``: the one-sided bin
    ``[x, x + 1/2^nbits]``. This is not an exactly normalised likelihood: the bins are narrower
    than the spacing of the data (``1/2^nbits`` against ``1/(2^nbits - 1)``), the end bins do
    not extend to infinity, and ``1e-7`` is added to every bin.

    Temperature ``T`` multiplies the logistic scale of a draw, which is snapped to the nearest
    grid value (the release has no DL sampling); ``T = 0`` is the mode, the clamped mean
    snapped to the grid.
    """

    MEAN_LIMIT = 0.5 - 1.0 / 512.0

    def __init__(self, nbits: int = 8) -> None:
        super().__init__()
        _check_nbits(nbits)
        self.nbits = nbits
        self.max_level = 2**nbits - 1
        self.bin_width = 1.0 / 2**nbits
        self.log_scale = nn.Parameter(torch.zeros(()))

    def num_params(self, channels: int) -> int:
        return channels

    def preprocess(self, images: Tensor) -> Tensor:
        return self._to_data(_quantise(images, self.nbits))

    def postprocess(self, x: Tensor) -> Tensor:
        return self._to_levels(x) / self.max_level

    def _to_data(self, levels: Tensor) -> Tensor:
        return levels / self.max_level - 0.5

    def _to_levels(self, x: Tensor) -> Tensor:
        return torch.round((x + 0.5) * self.max_level).clamp(0, self.max_level)

    def _mean(self, params: Tensor) -> Tensor:
        return params.clamp(-self.MEAN_LIMIT, self.MEAN_LIMIT)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        x, params = _at_least_float32(x), _at_least_float32(params)
        scale = torch.exp(_at_least_float32(self.log_scale))
        lower = (x - self._mean(params)) / scale
        mass = torch.sigmoid(lower + self.bin_width / scale) - torch.sigmoid(lower)
        return torch.log(mass + 1e-7).flatten(1).sum(dim=1)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        _check_temperature(temperature)
        if temperature == 0:
            return self.mode(params)
        noise = temperature * torch.exp(self.log_scale) * _logistic_noise(params)
        return self._to_data(self._to_levels(self._mean(params) + noise))

    def mode(self, params: Tensor) -> Tensor:
        """The clamped mean snapped to the nearest grid value."""
        return self._to_data(self._to_levels(self._mean(params)))


class Bernoulli(ObservationModel):
    """Independent Bernoulli pixels from logits; data in {0, 1} (pixels >= 128 are 1).

    Temperature ``T`` divides the logits, ``p = sigmoid(logits / T)``; ``T = 0`` is the mode.
    """

    def num_params(self, channels: int) -> int:
        return channels

    def preprocess(self, images: Tensor) -> Tensor:
        return (_quantise(images, 1) > 0).float()

    def postprocess(self, x: Tensor) -> Tensor:
        return x.float().clamp(0, 1)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        x, params = _at_least_float32(x), _at_least_float32(params)
        log_probs = -F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return log_probs.flatten(1).sum(dim=1)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        _check_temperature(temperature)
        if temperature == 0:
            return self.mode(params)
        return torch.bernoulli(torch.sigmoid(params / temperature))

    def mode(self, params: Tensor) -> Tensor:
        """1 where the logit is positive, else 0."""
        return (params > 0).to(params.dtype)


# --------------------------------------------------------------------------------------------
# Factories (names as in the release's hyper-parameters)
# --------------------------------------------------------------------------------------------

_POSTERIORS = dict(zip(POSTERIORS, (IAFPosterior, IsoGaussianPosterior), strict=True))
_PRIORS = dict(zip(PRIORS, (IsoGaussianPrior,), strict=True))


def _unknown(kind: str, name: str, choices: Iterable[str]) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")


def build_posterior(name: str, z_size: int) -> nn.Module:
    """The posterior named by ``post_model``: ``"IAF"`` or ``"IsoGaussian"``."""
    if name not in _POSTERIORS:
        raise _unknown("post_model", name, POSTERIORS)
    return _POSTERIORS[name](z_size)


def build_prior(name: str, z_size: int) -> nn.Module:
    """The prior named by ``prior_model``: ``"IsoGaussian"``."""
    if name not in _PRIORS:
        raise _unknown("prior_model", name, PRIORS)
    return _PRIORS[name](z_size)


def build_observation(name: str, channels: int, mix_components: int, nbits: int) -> ObservationModel:
    """The observation model named by ``obs_model``: ``"DML"``, ``"DL"`` or ``"Bernoulli"``."""
    if name == "DML":
        return DiscretizedMixLogistic(channels, mix_components, nbits)
    if name == "DL":
        return DiscretizedLogistic(nbits)
    if name == "Bernoulli":
        return Bernoulli()
    raise _unknown("obs_model", name, OBSERVATIONS)
