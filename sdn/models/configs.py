"""Hyper-parameters of the two VAEs (plain dataclasses; importing them needs no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DensityConfig:
    """Hyper-parameters of the SDN-VAE, named as in the paper's release."""

    image_size: int
    channels: int
    z_size: int = 4
    h_size: int = 200
    depth: int = 15
    ds_list: list[int] = field(default_factory=lambda: [5, 10])
    downsample_first: bool = False
    sdn_max_scale: int = 32
    sdn_min_scale: int = 0
    sdn_nfeat_0: int = 360
    sdn_nfeat_diff: int = 0
    sdn_num_dirs: int = 2
    post_model: str = "IAF"
    prior_model: str = "IsoGaussian"
    obs_model: str = "DML"
    mix_components: int = 5
    nbits: int = 8
    free_bits: float = 0.0


@dataclass
class DisentanglementConfig:
    """Hyper-parameters of the SDN β-VAE, named as in the paper's release."""

    image_size: int = 64
    channels: int = 3
    z_size: int = 10
    sdn_max_scale: int = 32
    sdn_min_scale: int = 32
    sdn_nfeat_0: int = 200
    sdn_nfeat_diff: int = 0
    sdn_num_dirs: int = 1
    obs_model: str = "DL"
    mix_components: int = 5
    nbits: int = 8
    beta_final: float = 1.0
    beta_rate: float = 1.0
