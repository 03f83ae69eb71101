"""SDN-VAE: a ladder (IAF-VAE style) VAE for density estimation, with SDN layers in the decoder.

The model is a plain `nn.Module` built from a `DensityConfig`; it never touches data. Images enter
already in the observation model's data space (`model.obs.preprocess(uint8_images)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdn.hyperparameters import (
    DensityConfig,
    conv_geometry,
    input_padding,
    ladder_scales,
    last_layer_uses_sdn,
    uses_sdn_at,
)
from sdn.layers import DirectionCycle, ResSDNLayer
from sdn.models.latents import build_posterior, build_prior
from sdn.models.observations import build_observation


@dataclass
class LayerPlan:
    """How one ladder layer is built (`plan_ladder`); the model keeps its plans as `plans`."""

    scale: int
    downsample: bool
    use_sdn: bool
    sdn_features: int | None
    dirs_a: list[int] | None
    dirs_b: list[int] | None


def _split(x: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    return x.split(sizes, dim=1)


class LadderLayer(nn.Module):
    """One stochastic layer: a bottom-up (inference) half and a top-down (generative) half."""

    def __init__(self, cfg: DensityConfig, plan: LayerPlan) -> None:
        super().__init__()
        h, z = cfg.h_size, cfg.z_size
        self.downsample = plan.downsample
        self.posterior = build_posterior(cfg.post_model, z)
        self.prior = build_prior(cfg.prior_model, z)
        q_size, p_size = self.posterior.num_params, self.prior.num_params
        self.up_sizes = [h, q_size]
        self.down_sizes = [h, q_size, p_size]
        k, s, p = conv_geometry(plan.downsample)

        self.up_a = nn.Conv2d(h, h + q_size, k, s, p)
        self.up_b = nn.Conv2d(h, 2 * h, 3, 1, 1)
        if plan.use_sdn:
            feats = plan.sdn_features
            self.down_a = ResSDNLayer(h, h + q_size + p_size, feats, plan.dirs_a, 3, 1, 1)
            self.down_b = ResSDNLayer(h + z, 2 * h, feats, plan.dirs_b, k, s, p, upsample=plan.downsample)
        else:
            self.down_a = nn.Conv2d(h, h + q_size + p_size, 3, 1, 1)
            conv = nn.ConvTranspose2d if plan.downsample else nn.Conv2d
            self.down_b = conv(h + z, 2 * h, k, s, p)

    def up(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Bottom-up step: the next deterministic map and this layer's posterior parameters."""
        t_h, q_up = _split(self.up_a(F.elu(x)), self.up_sizes)
        t_h, gate = self.up_b(F.elu(t_h)).chunk(2, dim=1)
        gate = torch.sigmoid(gate - 1)
        if self.downsample:
            x = F.interpolate(x, scale_factor=0.5)
        return (1 - gate) * x + gate * t_h, q_up

    def down(
        self,
        x: Tensor,
        q_up: Tensor | None = None,
        z: Tensor | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Top-down step.

        With `q_up` (inference) the latent is drawn from the posterior and the KL is returned
        per image; otherwise `z` is used if given, else drawn from the prior at `temperature`.
        Returns (next map, z, kl or None).
        """
        h_det, q_down, p_params = _split(self.down_a(F.elu(x)), self.down_sizes)
        kl = None
        if q_up is not None:
            z, log_q = self.posterior(q_up + q_down)
            log_p = self.prior.log_prob(z, p_params)
            kl = (log_q - log_p).flatten(1).sum(1)
        elif z is None:
            z = self.prior.sample(p_params, temperature)
        t_h, gate = self.down_b(F.elu(torch.cat([z, h_det], dim=1))).chunk(2, dim=1)
        gate = torch.sigmoid(gate - 1)
        if self.downsample:
            x = F.interpolate(x, scale_factor=2.0)
        return (1 - gate) * x + gate * t_h, z, kl


def plan_ladder(cfg: DensityConfig, directions: DirectionCycle) -> tuple[list[LayerPlan], int]:
    """Scales, SDN use, features and directions of each ladder layer (bottom to top)."""
    layers, top_scale = ladder_scales(cfg)
    feats = cfg.sdn_nfeat_0
    plans = []
    for scale, downsample in layers:
        use_sdn = uses_sdn_at(cfg, scale)
        dirs_a = directions.take(cfg.sdn_num_dirs) if use_sdn else None
        dirs_b = directions.take(cfg.sdn_num_dirs) if use_sdn else None
        plans.append(LayerPlan(scale, downsample, use_sdn, feats if use_sdn else None, dirs_a, dirs_b))
        if downsample and use_sdn:
            feats = max(50, feats - cfg.sdn_nfeat_diff)
    return plans, top_scale


class DensityVAE(nn.Module):
    """The SDN-VAE of the paper (a CNN baseline when no scale falls in the SDN range).

    >>> cfg = DensityConfig(image_size=8, channels=3, z_size=2, h_size=8, depth=2, ds_list=[1],
    ...                     sdn_max_scale=8, sdn_nfeat_0=8, sdn_num_dirs=1, mix_components=2)
    >>> model = DensityVAE(cfg)
    >>> x = model.obs.preprocess(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    >>> model(x)["elbo"].shape
    torch.Size([2])
    """

    def __init__(self, cfg: DensityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.obs = build_observation(cfg.obs_model, cfg.channels, cfg.mix_components, cfg.nbits)
        directions = DirectionCycle()
        self.pad = input_padding(cfg.image_size)
        k, s, p = conv_geometry(cfg.downsample_first)
        self.first_layer = nn.Conv2d(cfg.channels, cfg.h_size, k, s, p)
        self.plans, self.top_scale = plan_ladder(cfg, directions)
        self.ladder = nn.ModuleList(LadderLayer(cfg, plan) for plan in self.plans)
        self.top = nn.Parameter(torch.zeros(cfg.h_size))
        out_channels = self.obs.num_params(cfg.channels)
        self.last_uses_sdn = last_layer_uses_sdn(cfg)
        if self.last_uses_sdn:
            self.last_layer = ResSDNLayer(
                cfg.h_size,
                out_channels,
                cfg.sdn_nfeat_0,
                directions.take(4),
                k,
                s,
                p,
                upsample=cfg.downsample_first,
            )
        else:
            conv = nn.ConvTranspose2d if cfg.downsample_first else nn.Conv2d
            self.last_layer = conv(cfg.h_size, out_channels, k, s, p)

    @property
    def dims_per_image(self) -> int:
        return self.cfg.channels * self.cfg.image_size**2

    def _top_input(self, batch: int) -> Tensor:
        return self.top.view(1, -1, 1, 1).expand(batch, -1, self.top_scale, self.top_scale)

    def _decode_params(self, h: Tensor) -> Tensor:
        if self.pad:
            h = h[..., self.pad : -self.pad, self.pad : -self.pad]
        return self.last_layer(F.elu(h))

    def _bottom_up(self, x: Tensor) -> list[Tensor]:
        self._check_input(x)
        h = F.pad(self.first_layer(x), [self.pad] * 4)
        q_ups = []
        for layer in self.ladder:
            h, q_up = layer.up(h)
            q_ups.append(q_up)
        return q_ups

    def _check_input(self, x: Tensor) -> None:
        expected = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DensityVAE expects images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}: check that the dataset matches the experiment's image size."
            )

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """One posterior sample per image.

        Returns per-image `log_px` (log p(x|z)), `kl` (summed over layers), `kl_layers`
        (list, top layer first), `kl_obj` (the free-bits objective), `elbo`, `loss`, and the
        latents `z` (list, top layer first).
        """
        q_ups = self._bottom_up(x)
        h = self._top_input(x.shape[0])
        latents, kls, kl_objs = [], [], []
        for layer, q_up in zip(reversed(self.ladder), reversed(q_ups), strict=True):
            h, z, kl = layer.down(h, q_up=q_up)
            latents.append(z)
            kls.append(kl)
            kl_objs.append(self._free_bits(kl))
        log_px = self.obs.log_prob(x, self._decode_params(h))
        kl = torch.stack(kls).sum(0)
        kl_obj = torch.stack(kl_objs).sum(0)
        return {
            "log_px": log_px,
            "kl": kl,
            "kl_layers": kls,
            "kl_obj": kl_obj,
            "elbo": log_px - kl,
            "loss": -(log_px - kl_obj),
            "z": latents,
        }

    def _free_bits(self, kl: Tensor) -> Tensor:
        # As released: per layer, lifts the batch-mean KL towards `free_bits` (docs/maths.md#free-bits).
        mean = kl.mean()
        return kl + (torch.clamp(mean, min=self.cfg.free_bits) - mean) / kl.shape[0]

    def loss(self, out: dict[str, Tensor | list[Tensor]], step: int) -> Tensor:
        """Per-image training loss −(log p(x|z) − KL with free bits); the same at every `step`."""
        return out["loss"]

    def elbo(self, x: Tensor) -> dict[str, Tensor]:
        """Single-sample ELBO and KL per image (the evaluation's callable)."""
        out = self(x)
        return {"elbo": out["elbo"], "kl": out["kl"]}

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Posterior latents of `x` (one sample per layer, top layer first)."""
        return self(x)["z"]

    @torch.no_grad()
    def decode(
        self,
        latents: list[Tensor | None],
        temperature: float = 1.0,
        batch: int | None = None,
        sample_pixels: bool = False,
    ) -> Tensor:
        """Images from latents given top layer first; `None` entries (or a short list) are
        drawn from the prior at `temperature`. Returns the observation model's mode (or a
        sample when `sample_pixels`) in data space."""
        if batch is None:
            known = [z for z in latents if z is not None]
            if not known:
                raise ValueError("decode needs `batch` when no latent is given.")
            batch = known[0].shape[0]
        h = self._top_input(batch)
        for i, layer in enumerate(reversed(self.ladder)):
            z = latents[i] if i < len(latents) else None
            h, _, _ = layer.down(h, z=z, temperature=temperature)
        params = self._decode_params(h)
        return self.obs.sample(params, temperature) if sample_pixels else self.obs.mode(params)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """`n` images with every latent drawn from the prior at `temperature`."""
        return self.decode([], temperature=temperature, batch=n)
