"""The β-VAE of the paper's disentanglement experiments, with SDN layers in its decoder (64×64)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdn.hyperparameters import BETA_VAE_SCALES, DisentanglementConfig, uses_sdn_at
from sdn.layers import DirectionCycle, SDNLayer
from sdn.models.observations import build_observation

# Decoder stages after the 4×4 reshape: (in channels, out channels, output scale).
_STAGES = tuple(zip((64, 64, 32, 32), (64, 32, 32, None), BETA_VAE_SCALES, strict=True))


class DisentanglementVAE(nn.Module):
    """Convolutional encoder, MLP + (SDN or transposed-conv) decoder, isotropic Gaussian latents.

    >>> model = DisentanglementVAE(DisentanglementConfig(z_size=4, sdn_nfeat_0=8))
    >>> x = model.obs.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    >>> model(x)["elbo"].shape
    torch.Size([2])
    """

    def __init__(self, cfg: DisentanglementConfig) -> None:
        super().__init__()
        if cfg.image_size != 64:
            raise ValueError(
                f"DisentanglementVAE is built for 64x64 images, got image_size={cfg.image_size}."
            )
        self.cfg = cfg
        self.obs = build_observation(cfg.obs_model, cfg.channels, cfg.mix_components, cfg.nbits)
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, 32, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 2 * cfg.z_size),
        )
        directions = DirectionCycle()
        features = cfg.sdn_nfeat_0
        layers: list[nn.Module] = [
            nn.Linear(cfg.z_size, 256),
            nn.ReLU(),
            nn.Linear(256, 64 * 4 * 4),
            nn.ReLU(),
            nn.Unflatten(1, (64, 4, 4)),
        ]
        self.stage_uses_sdn = []
        for in_ch, out_ch, scale in _STAGES:
            out_ch = out_ch or self.obs.num_params(cfg.channels)
            use_sdn = uses_sdn_at(cfg, scale)
            self.stage_uses_sdn.append(use_sdn)
            if use_sdn:
                dirs = directions.take(cfg.sdn_num_dirs)
                layers.append(SDNLayer(in_ch, out_ch, features, dirs, 4, 2, 1, upsample=True))
                features = max(1, features - cfg.sdn_nfeat_diff)
            else:
                layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1))
            if scale != 64:
                layers.append(nn.ReLU())
        self.decoder = nn.Sequential(*layers)

    @property
    def dims_per_image(self) -> int:
        return self.cfg.channels * self.cfg.image_size**2

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x)."""
        expected = (self.cfg.channels, 64, 64)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DisentanglementVAE expects images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}: check that the dataset matches the experiment."
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """One posterior sample per image: `log_px`, `kl`, `elbo`, `z`.

        As released, the KL to N(0, I) is the one-sample estimate log q(z|x) − log p(z) at the
        drawn z (unbiased; the analytic KL is its expectation)."""
        mean, logvar = self.posterior_params(x)
        eps = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_px = self.obs.log_prob(x, self.decoder(z))
        # log N(z; mean, σ) written with eps, minus log N(z; 0, 1); the 2π terms cancel
        kl = (0.5 * (z**2 - eps**2) - 0.5 * logvar).sum(1)
        return {"log_px": log_px, "kl": kl, "elbo": log_px - kl, "z": z}

    def beta(self, step: int) -> float:
        """β for optimizer step `step` (counted from 0): the schedule after `step + 1` updates, as
        released."""
        return beta_schedule(step + 1, self.cfg.beta_final, self.cfg.beta_rate)

    def loss(self, out: dict[str, Tensor], step: int) -> Tensor:
        """Per-image β-VAE loss −(log p(x|z) − β·KL) at optimizer step `step`, β annealed."""
        return -(out["log_px"] - self.beta(step) * out["kl"])

    def elbo(self, x: Tensor) -> dict[str, Tensor]:
        out = self(x)
        return {"elbo": out["elbo"], "kl": out["kl"]}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Posterior means: the representation scored by the disentanglement metrics."""
        return self.posterior_params(x)[0]

    @torch.no_grad()
    def decode(self, z: Tensor, temperature: float = 0.0) -> Tensor:
        """Images (data space) from codes: the observation mode, or a sample at `temperature` > 0."""
        params = self.decoder(z)
        return self.obs.sample(params, temperature) if temperature > 0 else self.obs.mode(params)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """`n` images decoded (mode) from z ~ N(0, T²I)."""
        device = next(self.parameters()).device
        z = temperature * torch.randn(n, self.cfg.z_size, device=device)
        return self.obs.mode(self.decoder(z))


def beta_schedule(step: int, beta_final: float, beta_rate: float) -> float:
    """β after `step` updates: β_t = min(β_final, β_{t−1} + β_rate·β_final), β_0 = 0."""
    return min(beta_final, step * beta_rate * beta_final)
