"""Fidelity to the authors' release (github djordjemila/sdn, its final `train_*.sh`): parameter
counts of every paper preset derived from the release's module structure, weight-norm shapes, the
β-VAE training regime, the release's DL, the IAF mask's gradient, DML mode and sampling, the
latent interpolation, and what a mixed-precision overflow does to training.

Every expected value here is computed from the release's equations and structure as written in
the paper and the release's code (summarised in docs/maths.md), never from this project's modules.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from sdn.config import experiment_config
from sdn.data.datamodule import StepBatchSampler
from sdn.evaluation.samples import interpolate_density
from sdn.hyperparameters import DensityConfig
from sdn.models import build_model, prepare_model
from sdn.models.density import DensityVAE
from sdn.models.disentanglement import DisentanglementVAE
from sdn.models.latents import MaskedConv2d
from sdn.models.observations import DiscretizedLogistic, DiscretizedMixLogistic
from sdn.params import load_params
from sdn.training.module import VAEModule, count_parameters, load_ema_model
from tests.params_tools import detach

PARAMS = load_params()
PAPER_PRESETS = [
    f"{run}-{kind}" for run in ("cifar10", "imagenet32", "celebahq256", "3dshapes") for kind in ("sdn", "cnn")
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Parameter counts as the release's `count_pars` reports them, from the release's module structure
#
# lib/utils.py: `WN` gives every module whose class name contains "Conv" (Conv2d, ConvTranspose2d,
# the IAF's MaskedConv2d) a weight_g of one value per output channel beside weight_v (the weight's
# shape); GRUCells and Linears are not normalised. lib/nn.py: SDNLayer = project-in conv (transposed
# when upsampling) + one GRUCell(3F, F) per direction + 1x1 project-out conv; ResSDNLayer = SDNLayer
# to 2*out + a plain conv to out. LadderLayer: up_a, up_b, the posterior's ARCNN (IAF: conv_a z->c,
# then c->c and c->2z, all 3x3 masked), down_a, down_b. lib/DensityVAE.py: first layer, the ladder,
# the learned top vector `h`, the last layer. lib/probability.py: IAF context c = max(100 // z, 1)*z,
# params_per_dim 2 + c/z; IsoGaussian 2; DML 3*C*M + M outputs and no parameters; DL C outputs and
# one learned log-scale. lib/DisentanglementVAE.py: the β-VAE, never weight-normalised.


def release_conv(cin: int, cout: int, k: int, wn: bool) -> int:
    return cin * cout * k * k + cout + (cout if wn else 0)  # weight (v), bias, weight_g


def release_gru(features: int) -> int:
    return 3 * features * 3 * features + 3 * features * features + 2 * 3 * features


def release_sdn(cin: int, cout: int, features: int, dirs: int, k: int, wn: bool) -> int:
    project_in, project_out = release_conv(cin, features, k, wn), release_conv(features, cout, 1, wn)
    return project_in + dirs * release_gru(features) + project_out


def release_res_sdn(cin: int, cout: int, features: int, dirs: int, k: int, wn: bool) -> int:
    return release_sdn(cin, 2 * cout, features, dirs, k, wn) + release_conv(cin, cout, k, wn)


def release_density_count(m: DensityConfig, wn: bool = True) -> int:
    """lib/DensityVAE.py's constructor, walked layer by layer."""
    h, z = m.h_size, m.z_size
    context = max(100 // z, 1) * z
    q_size = z * (2 + context // z if m.post_model == "IAF" else 2)
    p_size = 2 * z
    obs_out = m.mix_components + 3 * m.channels * m.mix_components
    k_first = 4 if m.downsample_first else 3
    total = release_conv(m.channels, h, k_first, wn) + h  # first layer, top vector h
    dim = (m.image_size + (4 if m.image_size == 28 else 0)) // (2 if m.downsample_first else 1)
    features = m.sdn_nfeat_0
    for i in range(m.depth):
        downsample = i in m.ds_list and dim > 1
        use_sdn = m.sdn_max_scale >= dim >= m.sdn_min_scale
        k = 4 if downsample else 3
        total += release_conv(h, h + q_size, k, wn) + release_conv(h, 2 * h, 3, wn)
        if m.post_model == "IAF":
            total += (release_conv(z, context, 3, wn) + release_conv(context, context, 3, wn)
                      + release_conv(context, 2 * z, 3, wn))
        if use_sdn:
            total += release_res_sdn(h, h + q_size + p_size, features, m.sdn_num_dirs, 3, wn)
            total += release_res_sdn(h + z, 2 * h, features, m.sdn_num_dirs, k, wn)
        else:
            total += release_conv(h, h + q_size + p_size, 3, wn) + release_conv(h + z, 2 * h, k, wn)
        if downsample:
            dim = max(1, dim // 2)
            if use_sdn:
                features = max(50, features - m.sdn_nfeat_diff)
    if m.sdn_max_scale >= m.image_size:
        total += release_res_sdn(h, obs_out, m.sdn_nfeat_0, 4, k_first, wn)
    else:
        total += release_conv(h, obs_out, k_first, wn)
    return total


def release_beta_vae_count(m) -> int:
    """lib/DisentanglementVAE.py's create_enc_dec_networks (no weight norm), DL observations."""
    z, wn = m.z_size, False
    encoder = (release_conv(m.channels, 32, 4, wn) + release_conv(32, 32, 4, wn) + release_conv(32, 64, 4, wn)
               + release_conv(64, 64, 4, wn) + 64 * 4 * 4 * 2 * z + 2 * z)
    decoder = z * 256 + 256 + 256 * 4 * 4 * 64 + 4 * 4 * 64
    features = m.sdn_nfeat_0
    for cin, cout, scale in ((64, 64, 8), (64, 32, 16), (32, 32, 32), (32, m.channels, 64)):
        if m.sdn_min_scale <= scale <= m.sdn_max_scale:
            decoder += release_sdn(cin, cout, features, m.sdn_num_dirs, 4, wn)
            features -= m.sdn_nfeat_diff
        else:
            decoder += release_conv(cin, cout, 4, wn)
    return encoder + decoder + 1  # + the DL's log-scale


def preset_model(name: str) -> nn.Module:
    cfg = experiment_config(PARAMS, name)
    with torch.device("meta"):  # structure only: no memory, and no time spent on initialisation
        return prepare_model(build_model(cfg), cfg.train)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_preset_parameter_counts_are_the_releases(name):
    cfg = experiment_config(PARAMS, name)
    release = release_density_count(cfg.model) if cfg.kind == "density" else release_beta_vae_count(cfg.model)
    assert count_parameters(preset_model(name)) == release


def test_cifar10_counts_are_the_ones_the_release_prints():
    # docs/maths.md#paper-runs: the release's count_pars, after and before weight norm
    sdn, cnn = (experiment_config(PARAMS, f"cifar10-{kind}").model for kind in ("sdn", "cnn"))
    assert (release_density_count(sdn), release_density_count(cnn)) == (121_486_444, 42_325_860)
    assert (release_density_count(sdn, wn=False), release_density_count(cnn, wn=False)) == (
        121_432_302, 42_301_130,
    )
    assert count_parameters(preset_model("cifar10-sdn")) == 121_486_444
    assert count_parameters(preset_model("cifar10-cnn")) == 42_325_860


# ---------------------------------------------------------------------------------------------
# Weight norm and initialisation of the density models


def density_cfg(**overrides) -> DensityConfig:
    base = dict(image_size=8, channels=3, z_size=2, h_size=8, depth=2, ds_list=[0], sdn_max_scale=8,
                sdn_nfeat_0=6, sdn_num_dirs=1, post_model="IAF", mix_components=2, free_bits=0.01)
    return DensityConfig(**{**base, **overrides})


def test_weight_norm_is_per_output_channel_for_transposed_convs_too():
    cfg = experiment_config(PARAMS, "photos32-sdn")
    model = prepare_model(DensityVAE(density_cfg(downsample_first=True)), cfg.train)
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    plain = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert transposed and plain
    for conv in transposed:  # weight (in, out, k, k): one gain per output channel, dim 1
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
        assert g.shape == (1, conv.out_channels, 1, 1)
        assert v.shape == (conv.in_channels, conv.out_channels, 4, 4)
        norms = v.detach().transpose(0, 1).flatten(1).norm(dim=1)
        torch.testing.assert_close(conv.weight.detach().transpose(0, 1).flatten(1).norm(dim=1), g.flatten())
        torch.testing.assert_close(g.detach().flatten(), norms)  # g starts at |v|: the init is kept
    for conv in plain:
        g = conv.parametrizations.weight.original0
        assert g.shape == (conv.out_channels, 1, 1, 1)


def test_conv_biases_keep_pytorchs_default_init():
    torch.manual_seed(0)
    raw = DensityVAE(density_cfg())
    before = {name: p.detach().clone() for name, p in raw.named_parameters() if name.endswith("bias")}
    model = prepare_model(raw, experiment_config(PARAMS, "photos32-sdn").train)
    after = dict(model.named_parameters())
    assert len(before) > 10
    for name in before:
        assert torch.equal(after[name], before[name]), name
        assert after[name].abs().max() > 0, name  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zero


# ---------------------------------------------------------------------------------------------
# The β-VAE regime: no weight norm, no EMA, full precision, constant rate, N(0, 0.02) Linears


@pytest.mark.parametrize("name", ["sprites-sdn", "sprites-cnn", "3dshapes-sdn", "3dshapes-cnn"])
def test_beta_vae_presets_train_in_the_releases_beta_vae_regime(name):
    cfg = experiment_config(PARAMS, name)
    assert cfg.kind == "disentanglement"
    assert cfg.train.weight_norm is False and cfg.train.ema_coef is None
    assert cfg.train.lrate_decay == 1.0 and str(cfg.trainer.precision) == "32-true"
    assert cfg.train.init == "orthogonal"


def test_beta_vae_init_orthogonal_convs_normal_linears_default_biases():
    cfg = experiment_config(PARAMS, "3dshapes-sdn")
    torch.manual_seed(0)
    raw = DisentanglementVAE(cfg.model)
    biases = {n: p.detach().clone() for n, p in raw.named_parameters() if n.endswith("bias")}
    model = prepare_model(raw, cfg.train)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert len(linears) == 3 and weights.numel() > 270_000
    # N(0, 0.02) over 270k values: the standard error of the std is 0.02 / sqrt(2n) < 3e-5
    assert weights.std().item() == pytest.approx(0.02, abs=3e-4)
    assert abs(weights.mean().item()) < 3e-4
    for name, bias in biases.items():  # PyTorch's default U(-1/sqrt(fan_in), ...), untouched
        assert torch.equal(dict(model.named_parameters())[name], bias), name
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        rows = conv.weight.detach().flatten(1)
        gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
        torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-4, rtol=0)


def random_images(count: int, size: int) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def cpu_trainer(steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, **kwargs,
    )


def beta_vae_experiment():
    params = copy.deepcopy(PARAMS)
    experiment = detach(params, "sprites-sdn")
    # the release's β-VAE observation model (the offline sprites default models with DML)
    experiment["model"] = {**experiment["model"], "z_size": 2, "sdn_nfeat_0": 4, "obs_model": "DL"}
    experiment["train"] = {**experiment["train"], "batch_size": 2, "lr": 0.01}
    return experiment_config(params, "sprites-sdn")


def test_beta_vae_without_ema_trains_at_a_constant_rate_and_loads_the_raw_weights(tmp_path):
    cfg = beta_vae_experiment()
    pl.seed_everything(0, verbose=False)
    module = VAEModule(cfg, steps_per_epoch=1)
    assert module.ema is None and module.eval_model is module.model
    images = random_images(4, 64)
    sampler = StepBatchSampler(4, 2, cfg.seed, total=3)
    trainer = cpu_trainer(3)
    start = [p.detach().clone() for p in module.model.parameters()]
    trainer.fit(module, DataLoader(TensorDataset(images), batch_sampler=sampler))
    assert any(not torch.equal(a, p) for a, p in zip(start, module.model.parameters(), strict=True))
    # a constant learning rate: every step at train.lr (the release's effectively constant cosine)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [cfg.train.lr]
    assert all(math.isclose(s.get_last_lr()[0], cfg.train.lr) for s in
               (c.scheduler for c in trainer.lr_scheduler_configs))

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(key.startswith("ema.") for key in state["state_dict"])
    loaded = load_ema_model(cfg, tmp_path / "last.ckpt")
    for got, want in zip(loaded.parameters(), module.model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert not loaded.training


def test_beta_vae_kl_is_the_one_sample_estimate():
    cfg = beta_vae_experiment()
    model = DisentanglementVAE(cfg.model).double()
    x = model.obs.preprocess(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)).double()
    mean, logvar = model.posterior_params(x)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    eps = torch.randn_like(mean)
    z = mean + torch.exp(0.5 * logvar) * eps
    torch.testing.assert_close(out["z"], z)
    log_q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(out["kl"], log_q - log_p)
    analytic = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    assert not torch.allclose(out["kl"], analytic)  # a sample, not the expectation


# ---------------------------------------------------------------------------------------------
# The release's DL, by hand


def release_data(pixel: int) -> float:
    """x as the release's transforms compute it, in float32: ToTensor's p / 255, then - 0.5."""
    return float(np.float32(np.float32(pixel) / np.float32(255)) - np.float32(0.5))


def release_dl(pixel: int, mean: float, log_scale: float, nbits: int = 8) -> float:
    """lib/probability.py's DL for one sub-pixel: x = p/255 - 0.5 (ToTensor, Normalize(0.5, 1)),
    the mean clamped to ±(0.5 - 1/512), the one-sided bin [x, x + 1/2^nbits], + 1e-7."""
    x = release_data(pixel)
    mean = min(max(mean, -0.5 + 1 / 512), 0.5 - 1 / 512)
    s = math.exp(log_scale)

    def sigmoid(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    return math.log(sigmoid((x - mean) / s + 1 / 2**nbits / s) - sigmoid((x - mean) / s) + 1e-7)


@pytest.mark.parametrize("pixel", [0, 1, 127, 128, 254, 255])
@pytest.mark.parametrize("mean", [-0.9, -0.5, -0.4975, 0.0, 0.013, 0.4975, 0.7])
@pytest.mark.parametrize("log_scale", [-6.0, -3.0, 0.0])
def test_dl_equals_the_releases_formula_at_the_edges_and_centre(pixel, mean, log_scale):
    model = DiscretizedLogistic(nbits=8).double()
    with torch.no_grad():
        model.log_scale.fill_(log_scale)
    x = model.preprocess(torch.tensor([[[[pixel]]]], dtype=torch.uint8)).double()
    assert x.item() == release_data(pixel)
    got = model.log_prob(x, torch.full((1, 1, 1, 1), mean, dtype=torch.float64)).item()
    assert got == pytest.approx(release_dl(pixel, mean, log_scale), rel=1e-6, abs=1e-6)


def test_dl_is_not_exactly_normalised():
    # as released: bins of 1/256 for values 1/255 apart, + 1e-7 each; a broad logistic's
    # total mass over the 256 values is then about 255/256 of one bin width per value
    model = DiscretizedLogistic(nbits=8).double()
    with torch.no_grad():
        model.log_scale.fill_(0.0)
    x = model.preprocess(torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)).double()
    total = model.log_prob(x, torch.zeros(256, 1, 1, 1, dtype=torch.float64)).exp().sum().item()
    expected = sum(math.exp(release_dl(p, 0.0, 0.0)) for p in range(256))
    assert total == pytest.approx(expected, rel=1e-9)
    assert abs(total - 1.0) > 0.5  # a scale of 1 spreads mass far beyond [-0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# IAF: masked taps get a gradient, as with the release's in-place `weight.data *= mask`


class InPlaceMaskedConv(nn.Conv2d):
    """The release's mechanism (lib/utils.py MaskedConv2d), re-enacted for comparison: the mask
    multiplies the weight's data in place before each forward, unseen by autograd."""

    def __init__(self, mask: Tensor, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data *= self.mask
        return super().forward(x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_taps_receive_the_releases_gradient_through_weight_norm(mask_type):
    torch.manual_seed(0)
    ours = MaskedConv2d(3, 5, 3, mask_type).double()
    nn.init.orthogonal_(ours.weight)
    release = InPlaceMaskedConv(ours.mask.clone(), 3, 5, 3, padding=1).double()
    with torch.no_grad():
        release.weight.copy_(ours.weight)
        release.bias.copy_(ours.bias)
    torch.nn.utils.parametrizations.weight_norm(ours)  # the project's weight norm
    torch.nn.utils.weight_norm(release)  # the release's (old-style hook) weight norm
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out_ours, out_release = ours(x), release(x)
    torch.testing.assert_close(out_ours, out_release)
    upstream = torch.randn_like(out_ours)
    (out_ours * upstream).sum().backward()
    (out_release * upstream).sum().backward()
    g_ours, v_ours = ours.parametrizations.weight.original0, ours.parametrizations.weight.original1
    torch.testing.assert_close(g_ours.grad, release.weight_g.grad)
    torch.testing.assert_close(v_ours.grad, release.weight_v.grad)
    hidden = ours.mask == 0
    assert v_ours.grad[:, :, hidden].abs().min() > 0  # the masked taps do learn


def test_masked_conv_output_and_input_gradient_use_the_masked_kernel():
    torch.manual_seed(1)
    conv = MaskedConv2d(2, 4, 3, "A").double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    reference = nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    out = conv(x)
    torch.testing.assert_close(out, reference)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(grad_x, want)


# ---------------------------------------------------------------------------------------------
# DML mode and sampling, as lib/probability.py's get_mean and sample_once


def dml_pixel(mix: int, logits, means, coeffs, log_scales=None) -> Tensor:
    """One RGB pixel's parameters: M logits, then per channel M means, M log-scales, M coefficients."""
    params = torch.zeros(1, mix + 9 * mix, 1, 1)
    params[0, :mix, 0, 0] = torch.tensor(logits)
    for channel in range(3):
        base = mix + channel * 3 * mix
        params[0, base : base + mix, 0, 0] = torch.tensor(means[channel])
        params[0, base + mix : base + 2 * mix, 0, 0] = torch.tensor(
            log_scales[channel] if log_scales else [-7.0] * mix
        )
        params[0, base + 2 * mix : base + 3 * mix, 0, 0] = torch.atanh(torch.tensor(coeffs[channel]))
    return params


def test_dml_mode_couples_channels_on_continuous_clamped_values():
    model = DiscretizedMixLogistic(channels=3, mix_components=2, nbits=1)  # grid {-1, 1}
    means = [[0.0, 0.2], [0.0, -0.3], [0.0, 0.4]]
    params = dml_pixel(2, [0.0, 3.0], means, [[0.0, 0.5], [0.0, -0.5], [0.0, 0.9]])
    # get_mean: r = 0.2; g = clamp(-0.3 + 0.5 r) = -0.2; b = clamp(0.4 - 0.5 r + 0.9 g) = 0.12, each
    # then snapped to the 1-bit grid: 1, -1, 1. Coupling on snapped values would give g = 0.2 -> 1.
    r, g = 0.2, -0.3 + 0.5 * 0.2
    b = 0.4 - 0.5 * r + 0.9 * g
    expected = [1.0 if v > 0 else -1.0 for v in (r, g, b)]
    assert expected == [1.0, -1.0, 1.0]
    assert model.mode(params)[0, :, 0, 0].tolist() == expected
    params8 = dml_pixel(1, [0.0], [[0.93], [0.5], [-0.2]], [[0.9], [0.6], [-0.8]])
    model8 = DiscretizedMixLogistic(channels=3, mix_components=1, nbits=8)
    r8 = 0.93
    g8 = min(1.0, 0.5 + 0.9 * r8)  # clamped to 1 before it is used for blue
    b8 = -0.2 + 0.6 * r8 - 0.8 * g8

    def snap(v: float) -> float:
        return round((v + 1) / 2 * 255) / 255 * 2 - 1

    expected8 = [snap(r8), snap(g8), snap(b8)]
    assert model8.mode(params8)[0, :, 0, 0].tolist() == pytest.approx(expected8, abs=1e-6)


def test_dml_temperature_scales_the_noise_not_the_choice_of_component():
    model = DiscretizedMixLogistic(channels=3, mix_components=2, nbits=8)
    params = dml_pixel(2, [math.log(0.7), math.log(0.3)], [[-0.5, 0.5]] * 3, [[0.0, 0.0]] * 3)
    torch.manual_seed(0)
    samples = model.sample(params.expand(20_000, -1, -1, -1).contiguous(), temperature=0.05)
    second = (samples[:, 0, 0, 0] > 0).double().mean().item()
    # softmax(logits) = (0.7, 0.3): 20k draws, a standard error of 0.0032
    assert second == pytest.approx(0.3, abs=0.02)
    # the logistic noise is scaled by T: e^-7 * 0.05 is far below a grid step, so the draws are the
    # component means snapped to the grid, levels round(0.25 * 255) = 64 and round(0.75 * 255) = 191
    levels = torch.round((samples[:, 0, 0, 0] + 1) / 2 * 255)
    assert set(levels.unique().tolist()) == {64.0, 191.0}


# ---------------------------------------------------------------------------------------------
# Latent interpolation, as evaluate.py --interpolation (DensityVAE.evaluate_latent_interpolation)


class RecordingDecoder:
    """Stands in for a trained model: fixed latents per image, decode records what it is given."""

    def __init__(self, depth: int) -> None:
        self.latents = [torch.stack([torch.full((1, 2, 2), float(i)), torch.full((1, 2, 2), float(i + 10))])
                        for i in range(depth)]
        self.decoded: list[list[Tensor]] = []
        self.obs = self

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.latents

    def decode(self, latents, temperature: float = 1.0, batch: int | None = None) -> Tensor:
        self.decoded.append(latents)
        return torch.zeros(1, 3, 4, 4)

    def postprocess(self, x: Tensor) -> Tensor:
        return x


def test_interpolation_fixes_layers_zero_to_il_at_the_releases_weights():
    model = RecordingDecoder(depth=6)
    rows = interpolate_density(model, torch.zeros(2, 3, 4, 4), layers=4, steps=7, temperature=0.6)
    assert rows.shape[0] == 7 + 2  # the first image, 7 interpolants, the second image
    assert len(model.decoded) == 7
    for i, latents in enumerate(model.decoded, start=1):
        assert len(latents) == 5  # `cnt <= interpolation_layer`: the top 5 layers for il = 4
        for layer, z in enumerate(latents):
            # (z0 * (times + 1 - i) + z1 * i) / (times + 1), endpoints excluded
            want = (layer * (8 - i) + (layer + 10) * i) / 8
            torch.testing.assert_close(z, torch.full((1, 1, 2, 2), want))


# ---------------------------------------------------------------------------------------------
# Mixed precision: an overflow in the scaled gradients skips the step, it does not stop training


class StepRecorder(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[list[Tensor]] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in module.model.parameters()])
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_amp_overflow_skips_the_step_and_training_goes_on():
    params = copy.deepcopy(PARAMS)
    params["datasets"]["photos32"]["image_size"] = 8
    experiment = detach(params, "photos32-sdn")
    experiment["model"] = {**experiment["model"], "h_size": 8, "depth": 2, "ds_list": [1], "sdn_max_scale": 8,
                           "sdn_nfeat_0": 4, "sdn_num_dirs": 1, "mix_components": 2}
    experiment["train"] = {**experiment["train"], "batch_size": 4, "lr": 0.01}
    cfg = experiment_config(params, "photos32-sdn")
    pl.seed_everything(0, verbose=False)
    module = VAEModule(cfg)
    start = [p.detach().clone() for p in module.model.parameters()]
    images = random_images(16, 8)
    steps = 8
    recorder = StepRecorder()
    # Lightning's scaler starts at 2^16, which overflows this model's float16 backward: the scaler
    # must skip those steps and halve the scale until the gradients are finite, as on a GPU.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = cpu_trainer(steps, callbacks=[recorder], plugins=[amp])
    sampler = StepBatchSampler(len(images), 4, cfg.seed, total=steps)
    trainer.fit(module, DataLoader(TensorDataset(images), batch_sampler=sampler))  # no NonFiniteLossError
    assert len(recorder.weights) == steps and trainer.global_step == steps
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[0], start, strict=True))  # skipped
    assert recorder.scales[0] == 2.0**15  # halved after the overflow
    assert recorder.scales[-1] < 2.0**15
    assert any(not torch.equal(a, b) for a, b in zip(recorder.weights[-1], start, strict=True))
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema.parameters())
