"""Observation models p(x | params) of both VAEs (docs/maths.md#observation-models).

Images are uint8 in 0..255; ``preprocess`` maps them to the model's data space:

* ``DiscretizedMixLogistic`` (DML, PixelCNN++): data in [-1, 1].
* ``DiscretizedLogistic`` (DL): data in [-0.5, 0.5], one learned global log-scale, as released
  (not exactly normalised).
* ``Bernoulli``: data in {0, 1}.

Each class carries the name the release's hyper-parameters give it (``obs_model``);
``OBSERVATION_MODELS`` maps those names to the classes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdn.models.distributions import at_least_float32, check_temperature, unknown_name


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


class ObservationModel(nn.Module, ABC):
    """p(x | params) for an image ``x`` in the model's data space (see ``preprocess``)."""

    name: str  # as `obs_model` names it

    @classmethod
    @abstractmethod
    def from_hyperparameters(cls, channels: int, mix_components: int, nbits: int) -> ObservationModel:
        """The model for ``channels``-channel images, from the knobs a configuration sets."""

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

    name = "DML"

    @classmethod
    def from_hyperparameters(cls, channels: int, mix_components: int, nbits: int) -> DiscretizedMixLogistic:
        return cls(channels, mix_components, nbits)

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
        x, params = at_least_float32(x), at_least_float32(params)
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
        check_temperature(temperature)
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

    name = "DL"
    MEAN_LIMIT = 0.5 - 1.0 / 512.0

    @classmethod
    def from_hyperparameters(cls, channels: int, mix_components: int, nbits: int) -> DiscretizedLogistic:
        return cls(nbits)

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
        x, params = at_least_float32(x), at_least_float32(params)
        scale = torch.exp(at_least_float32(self.log_scale))
        lower = (x - self._mean(params)) / scale
        mass = torch.sigmoid(lower + self.bin_width / scale) - torch.sigmoid(lower)
        return torch.log(mass + 1e-7).flatten(1).sum(dim=1)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        check_temperature(temperature)
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

    name = "Bernoulli"

    @classmethod
    def from_hyperparameters(cls, channels: int, mix_components: int, nbits: int) -> Bernoulli:
        return cls()

    def num_params(self, channels: int) -> int:
        return channels

    def preprocess(self, images: Tensor) -> Tensor:
        return (_quantise(images, 1) > 0).float()

    def postprocess(self, x: Tensor) -> Tensor:
        return x.float().clamp(0, 1)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        x, params = at_least_float32(x), at_least_float32(params)
        log_probs = -F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return log_probs.flatten(1).sum(dim=1)

    def sample(self, params: Tensor, temperature: float = 1.0) -> Tensor:
        check_temperature(temperature)
        if temperature == 0:
            return self.mode(params)
        return torch.bernoulli(torch.sigmoid(params / temperature))

    def mode(self, params: Tensor) -> Tensor:
        """1 where the logit is positive, else 0."""
        return (params > 0).to(params.dtype)


# The choices of `obs_model`, in the order error messages list them.
OBSERVATION_MODELS = {cls.name: cls for cls in (DiscretizedMixLogistic, DiscretizedLogistic, Bernoulli)}


def build_observation(name: str, channels: int, mix_components: int, nbits: int) -> ObservationModel:
    """The observation model named by ``obs_model``: ``"DML"``, ``"DL"`` or ``"Bernoulli"``."""
    if name not in OBSERVATION_MODELS:
        raise unknown_name("obs_model", name, OBSERVATION_MODELS)
    return OBSERVATION_MODELS[name].from_hyperparameters(channels, mix_components, nbits)
