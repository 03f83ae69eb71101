"""Hyper-parameters of the two VAEs and their geometry: plain dataclasses and no torch, so the
configuration (and through it every stage) reads them without importing the models (`sdn.models`)."""

from __future__ import annotations

from dataclasses import dataclass

from sdn.schema import AT_LEAST_1, NON_NEGATIVE, Range, ranged

# The choices of the models' string knobs, named as in the release's hyper-parameters; the
# distributions' tables (`sdn.models.latents`, `sdn.models.observations`) list the same names.
MODEL_KINDS = ("density", "disentanglement")
POSTERIORS = ("IAF", "IsoGaussian")
PRIORS = ("IsoGaussian",)
OBSERVATIONS = ("DML", "DL", "Bernoulli")
# The ranges of the numeric knobs both models share beyond counts: SDN sweep directions (0..4)
# and the bits per colour channel (1..8).
DIRECTIONS, BITS = Range(0, 4), Range(1, 8)


@dataclass
class DensityConfig:
    """Hyper-parameters of the SDN-VAE, named as in the paper's release."""

    image_size: int = ranged(allowed=AT_LEAST_1)
    channels: int = ranged(allowed=AT_LEAST_1)
    z_size: int = ranged(4, AT_LEAST_1)
    h_size: int = ranged(200, AT_LEAST_1)
    depth: int = ranged(15, AT_LEAST_1)
    ds_list: list[int] = ranged(allowed=NON_NEGATIVE, factory=lambda: [5, 10])
    downsample_first: bool = False
    sdn_max_scale: int = ranged(32, NON_NEGATIVE)
    sdn_min_scale: int = ranged(0, NON_NEGATIVE)
    sdn_nfeat_0: int = ranged(360, NON_NEGATIVE)
    sdn_nfeat_diff: int = ranged(0, NON_NEGATIVE)
    sdn_num_dirs: int = ranged(2, DIRECTIONS)
    post_model: str = "IAF"
    prior_model: str = "IsoGaussian"
    obs_model: str = "DML"
    mix_components: int = ranged(5, AT_LEAST_1)
    nbits: int = ranged(8, BITS)
    free_bits: float = ranged(0.0, NON_NEGATIVE)


@dataclass
class DisentanglementConfig:
    """Hyper-parameters of the SDN β-VAE, named as in the paper's release."""

    image_size: int = ranged(64, AT_LEAST_1)
    channels: int = ranged(3, AT_LEAST_1)
    z_size: int = ranged(10, AT_LEAST_1)
    sdn_max_scale: int = ranged(32, NON_NEGATIVE)
    sdn_min_scale: int = ranged(32, NON_NEGATIVE)
    sdn_nfeat_0: int = ranged(200, NON_NEGATIVE)
    sdn_nfeat_diff: int = ranged(0, NON_NEGATIVE)
    sdn_num_dirs: int = ranged(1, DIRECTIONS)
    obs_model: str = "DL"
    mix_components: int = ranged(5, AT_LEAST_1)
    nbits: int = ranged(8, BITS)
    beta_final: float = ranged(1.0, NON_NEGATIVE)
    beta_rate: float = ranged(1.0, Range(0, 1, low_open=True))


# --------------------------------------------------------------------------------------------
# Geometry: the one place that says at which scale each layer works and which layers are SDN


# The β-VAE decoder's stages after its 4×4 reshape each double the map: their output scales.
BETA_VAE_SCALES = (8, 16, 32, 64)


def input_padding(image_size: int) -> int:
    """Zero padding on each side of the density ladder's maps: 28×28 images (MNIST's size) work at
    32×32, as released, so that they halve evenly down the ladder."""
    return 2 if image_size == 28 else 0


def conv_geometry(resample: bool) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a convolution that halves (or, transposed, doubles) its map
    when `resample`, else keeps its size."""
    return (4, 2, 1) if resample else (3, 1, 1)


def ladder_scales(cfg: DensityConfig) -> tuple[list[tuple[int, bool]], int]:
    """(scale, whether it downsamples) of each ladder layer, bottom to top, and the scale of the
    top. The bottom scale is the first layer's output (halved with `downsample_first`) padded as
    `input_padding` says; a layer of `ds_list` halves its map unless it is already 1×1."""
    first = cfg.image_size // 2 if cfg.downsample_first else cfg.image_size
    scale = first + 2 * input_padding(cfg.image_size)
    layers = []
    for i in range(cfg.depth):
        downsample = i in cfg.ds_list and scale > 1
        layers.append((scale, downsample))
        if downsample:
            scale //= 2
    return layers, scale


def uses_sdn_at(cfg: DensityConfig | DisentanglementConfig, scale: int) -> bool:
    """Whether the layer working at `scale`×`scale` is an SDN layer (else a convolution)."""
    return cfg.sdn_min_scale <= scale <= cfg.sdn_max_scale


def last_layer_uses_sdn(cfg: DensityConfig) -> bool:
    """Whether the density model's last (output) layer is an SDN layer: as released, whenever
    `sdn_max_scale` reaches the image size, whatever `sdn_min_scale` says."""
    return cfg.sdn_max_scale >= cfg.image_size


def uses_sdn(cfg: DensityConfig | DisentanglementConfig) -> bool:
    """Whether any layer of the model is an SDN layer (a CNN baseline has none)."""
    if isinstance(cfg, DensityConfig):
        layers, _ = ladder_scales(cfg)
        return last_layer_uses_sdn(cfg) or any(uses_sdn_at(cfg, scale) for scale, _ in layers)
    return any(uses_sdn_at(cfg, scale) for scale in BETA_VAE_SCALES)
