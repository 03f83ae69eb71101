"""SDN-VAE and SDN β-VAE (docs/maths.md sections 2, 4, 7): structure against pinned plans and parameter
counts, the objective, sampling, overfitting one batch, EMA through a real Lightning Trainer, and
`python -m sdn info`."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from sdn.__main__ import describe
from sdn.__main__ import main as sdn_main
from sdn.config import TrainConfig, experiment_config
from sdn.data.datamodule import StepBatchSampler
from sdn.hyperparameters import DensityConfig, DisentanglementConfig
from sdn.layers import ResSDNLayer, SDNLayer
from sdn.models import build_model, prepare_model
from sdn.models.density import DensityVAE
from sdn.models.disentanglement import DisentanglementVAE, beta_schedule
from sdn.models.distributions import bits_per_dim
from sdn.models.latents import MaskedConv2d
from sdn.params import load_params
from sdn.training.module import VAEModule, count_parameters
from tests.params_tools import dataset_of, detach

REPO = Path(__file__).resolve().parents[1]
CONVS = (nn.Conv2d, nn.ConvTranspose2d)
PARAMS = load_params(REPO / "params.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def density_config(**overrides) -> DensityConfig:
    base = dict(
        image_size=8, channels=3, z_size=2, h_size=8, depth=3, ds_list=[1], downsample_first=False,
        sdn_max_scale=8, sdn_min_scale=0, sdn_nfeat_0=6, sdn_nfeat_diff=0, sdn_num_dirs=1,
        post_model="IsoGaussian", prior_model="IsoGaussian", obs_model="DML", mix_components=2,
        nbits=8, free_bits=0.01,
    )
    return DensityConfig(**{**base, **overrides})


NO_SDN = dict(sdn_max_scale=0, sdn_nfeat_0=0, sdn_num_dirs=0)
DENSITY_FAMILIES = {
    "iaf-dml-sdn": dict(post_model="IAF", sdn_num_dirs=2),
    "iaf-dml-cnn": dict(post_model="IAF", **NO_SDN),
    "isogaussian-dl-sdn": dict(obs_model="DL"),
    "isogaussian-dl-cnn": dict(obs_model="DL", **NO_SDN),
    "bernoulli-28x28-padded": dict(image_size=28, channels=1, obs_model="Bernoulli", ds_list=[0, 1]),
    "downsample-first": dict(post_model="IAF", downsample_first=True, depth=2),
    "downsample-first-cnn": dict(downsample_first=True, depth=2, obs_model="DL", **NO_SDN),
    # 16 (conv, downsamples) -> 8 (SDN, F 54) -> 4 (SDN, F 51) -> 2 (SDN, F max(50, 48) = 50)
    "feature-reduction": dict(image_size=16, depth=4, ds_list=[0, 1, 2], sdn_nfeat_0=54, sdn_nfeat_diff=3),
}


def beta_vae_config(**overrides) -> DisentanglementConfig:
    base = dict(z_size=3, sdn_max_scale=0, sdn_min_scale=0, sdn_nfeat_0=4, sdn_num_dirs=1, obs_model="DL")
    return DisentanglementConfig(**{**base, **overrides})


BETA_VAE_FAMILIES = {
    "sdn-at-8": dict(sdn_min_scale=8, sdn_max_scale=8),
    "sdn-at-16": dict(sdn_min_scale=16, sdn_max_scale=16),
    "sdn-at-32": dict(sdn_min_scale=32, sdn_max_scale=32),
    "sdn-at-64": dict(sdn_min_scale=64, sdn_max_scale=64),
    "sdn-everywhere": dict(sdn_min_scale=0, sdn_max_scale=64, sdn_num_dirs=2),
    "conv-only": dict(sdn_num_dirs=0, sdn_nfeat_0=0),
    "conv-only-dml": dict(sdn_num_dirs=0, sdn_nfeat_0=0, obs_model="DML", mix_components=2),
}


def images_for(cfg, batch: int = 2) -> Tensor:
    return torch.randint(0, 256, (batch, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)


def structured_images(batch: int, size: int) -> Tensor:
    """A few images a small model can memorise: one colour each, darkening left to right."""
    colours = torch.randint(0, 256, (batch, 3, 1, 1), generator=torch.Generator().manual_seed(0)).float()
    ramp = torch.linspace(0.5, 1.0, size).view(1, 1, 1, size)
    return (colours * ramp).round().to(torch.uint8).expand(batch, 3, size, size).contiguous()


def build_density(name: str) -> DensityVAE:
    return prepare_model(DensityVAE(density_config(**DENSITY_FAMILIES[name])), TrainConfig())


def build_beta_vae(name: str) -> DisentanglementVAE:
    return prepare_model(DisentanglementVAE(beta_vae_config(**BETA_VAE_FAMILIES[name])), TrainConfig())


def assert_on_data_grid(model: nn.Module, x: Tensor) -> None:
    """`x` is an image the observation model could have produced from uint8 pixels."""
    pixels = (model.obs.postprocess(x) * 255).round().to(torch.uint8)
    assert torch.equal(model.obs.preprocess(pixels), x)


def snapshot(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------
# Pinned facts: layer plans and parameter counts, worked out by hand from the release's structure
# (docs/maths.md sections 2, 7). A ladder row is (scale, downsamples, SDN features or None,
# [directions of down_a, directions of down_b] or None), bottom layer first; scales are map sizes
# (28x28 images are padded to 32). Counts include weight norm's gains (one per conv output
# channel), as the release's `count_pars` reports them after its weight norm.

D2 = [[0, 1], [2, 3]]  # two directions per sweep set: the cycle repeats every layer

# name: (ladder rows, last layer's directions or None, parameters)
FAMILY_PLANS = {
    # 8x8, ds at 1: F stays 6 until the downsampling SDN layer lifts it to the floor of 50
    "iaf-dml-sdn": ([(8, False, 6, D2), (8, True, 6, D2), (4, False, 50, D2)], [0, 1, 2, 3], 511_364),
    "iaf-dml-cnn": ([(8, False, None, None), (8, True, None, None), (4, False, None, None)], None, 355_120),
    "isogaussian-dl-sdn": (
        [(8, False, 6, [[0], [1]]), (8, True, 6, [[2], [3]]), (4, False, 50, [[0], [1]])],
        [2, 3, 0, 1], 96_339,
    ),
    "isogaussian-dl-cnn": (
        [(8, False, None, None), (8, True, None, None), (4, False, None, None)], None, 16_439,
    ),
    # 28 padded to 32, ds at 0 and 1: only the 8x8 layer is inside sdn_max_scale 8
    "bernoulli-28x28-padded": (
        [(32, True, None, None), (16, True, None, None), (8, False, 6, [[0], [1]])], None, 20_382,
    ),
    "downsample-first": ([(4, False, 6, [[0], [1]]), (4, True, 6, [[2], [3]])], [0, 1, 2, 3], 252_552),
    "downsample-first-cnn": ([(4, False, None, None), (4, True, None, None)], None, 12_047),
    # 16 (conv, downsamples) -> 8 (SDN, F 54) -> 4 (SDN, F 51) -> 2 (SDN, F max(50, 48) = 50)
    "feature-reduction": (
        [(16, True, None, None), (8, True, 54, [[0], [1]]), (4, True, 51, [[2], [3]]),
         (2, False, 50, [[0], [1]])],
        None, 263_660,
    ),
}

# name: ([(SDN features, directions) or None per decoder stage at 8, 16, 32, 64], parameters)
BETA_VAE_PLANS = {
    "sdn-at-8": ([(4, [0]), None, None, None], 442_477),
    "sdn-at-16": ([None, (4, [0]), None, None], 475_117),
    "sdn-at-32": ([None, None, (4, [0]), None], 489_453),
    "sdn-at-64": ([None, None, None, (4, [0])], 504_185),
    "sdn-everywhere": ([(4, [0, 1]), (4, [2, 3]), (4, [0, 1]), (4, [2, 3])], 401_785),
    "conv-only": ([None, None, None, None], 503_437),
    "conv-only-dml": ([None, None, None, None], 512_174),
}

# The density runs of params.yaml: per ladder layer its scale, which layers downsample, and for the
# SDN run its features and directions; the CNN baseline has the same scales and no SDN anywhere.
PAPER_LADDERS = {
    # 32x32, ds 5 10; F 360 -> 232 -> 104 (diff 128) after each downsampling SDN layer
    "cifar10": dict(
        scales=[32] * 6 + [16] * 5 + [8] * 4, downsample=[5, 10],
        features=[360] * 6 + [232] * 5 + [104] * 4, directions=[D2] * 15, last=[0, 1, 2, 3],
    ),
    # 32x32, ds 3 7 11, F 424 throughout (diff 0); three directions per set cycle over two layers
    "imagenet32": dict(
        scales=[32] * 4 + [16] * 4 + [8] * 4 + [4] * 4, downsample=[3, 7, 11], features=[424] * 16,
        directions=[[[0, 1, 2], [3, 0, 1]], [[2, 3, 0], [1, 2, 3]]] * 8, last=[0, 1, 2, 3],
    ),
    # 256x256, ds 4 7 9 11 13 15; SDN only at scale <= 64, so the last layer (256) is a conv
    "celebahq256": dict(
        scales=[256] * 5 + [128] * 3 + [64] * 2 + [32] * 2 + [16] * 2 + [8] * 2 + [4],
        downsample=[4, 7, 9, 11, 13, 15],
        features=[None] * 8 + [400] * 2 + [320] * 2 + [240] * 2 + [160] * 2 + [80],
        directions=[None] * 8 + [D2] * 9, last=None,
    ),
    # 32x32 at full resolution, ds 0 1 2; SDN only at scale <= 16, so layer 0 and the last are convs
    "photos32": dict(
        scales=[32, 16, 8, 4], downsample=[0, 1, 2], features=[None, 50, 50, 50],
        directions=[None, D2, D2, D2], last=None,
    ),
}

# Every experiment: (parameters as built, as trained = what `python -m sdn info` reports). Weight
# norm adds one gain per conv output channel to the density models; the β-VAEs train without it.
# CIFAR-10 is the paper run's figure (docs/maths.md#paper-runs); the others follow the same arithmetic.
PAPER_PARAMETERS = {
    "photos32-sdn": (864_726, 866_644),
    "photos32-cnn": (858_094, 859_540),
    "photos32-long-sdn": (864_726, 866_644),
    "photos32-long-cnn": (858_094, 859_540),
    "sprites-sdn": (532_288, 532_288),
    "sprites-cnn": (518_752, 518_752),
    "cifar10-sdn": (121_432_302, 121_486_444),
    "cifar10-cnn": (42_301_130, 42_325_860),
    "imagenet32-sdn": (299_142_044, 299_205_560),
    "imagenet32-cnn": (46_073_612, 46_100_024),
    "celebahq256-sdn": (100_091_380, 100_137_640),
    "celebahq256-cnn": (53_005_476, 53_033_992),
    "celebahq256-release": (100_091_380, 100_137_640),
    # 3dshapes-cnn by hand: encoder convs 1,568 + 16,416 + 32,832 + 65,600, Linear(1024, 20) 20,500;
    # decoder Linear 2,816 + 263,168, transposed convs 65,600 + 32,800 + 16,416 + 1,539 (DL: 3 out),
    # and the DL's one log-scale: 519,256. The SDN run swaps the 32x32 stage's 16,416 for
    # ConvT(32, 200, 4) 102,600 + GRUCell(600, 200) 481,200 + Conv(200, 32, 1) 6,432.
    "3dshapes-sdn": (1_093_072, 1_093_072),
    "3dshapes-cnn": (519_256, 519_256),
}

# docs/maths.md#paper-runs, CIFAR-10 SDN, per part (h 200, z 4, IAF context 100, so q 108 and p 8).
# Layer 0 by hand: up_a Conv(200, 308, 3) 555,016; up_b Conv(200, 400, 3) 720,800; IAF 3,800 +
# 90,200 + 7,216; down_a = SDN(200 -> 632, F 360: in 648,720, 2 x GRUCell(1080, 360) 3,114,720,
# out 228,784) + Conv(200, 316, 3) 569,432; down_b likewise from 204 channels to 400: 4,801,200.
CIFAR10_SDN_PARTS = dict(
    first_layer=5_800,  # Conv(3, 200, 3) with gains
    top=200,
    ladder=[10_739_888] * 5 + [12_256_368] + [6_450_352] * 4 + [7_784_048] + [3_733_680] * 4,
    # ResSDN(200 -> 50 DML outputs, F 360, 4 directions) + Conv(200, 50, 3)
    last_layer=7_004_460,
)


def ladder_rows(described: dict) -> list[tuple]:
    """`describe`'s ladder as table rows; also checks the fields the rows leave out agree."""
    rows = []
    for index, layer in enumerate(described["ladder"]):
        assert layer["index"] == index and layer["sdn"] == (layer["sdn_features"] is not None)
        rows.append((layer["scale"], layer["downsample"], layer["sdn_features"], layer["directions"]))
    return rows


def paper_rows(run: str, sdn: bool) -> list[tuple]:
    table = PAPER_LADDERS[run]
    depth = len(table["scales"])
    return [
        (table["scales"][i], i in table["downsample"], table["features"][i] if sdn else None,
         table["directions"][i] if sdn else None)
        for i in range(depth)
    ]


def build_on_meta(cfg, prepared: bool = False) -> nn.Module:
    with torch.device("meta"):  # shapes only: instant and without memory even for 10^8 weights
        model = build_model(cfg)
        return prepare_model(model, cfg.train) if prepared else model


# ---------------------------------------------------------------------------------------------
# Density model: structure


@pytest.mark.parametrize("name", DENSITY_FAMILIES)
def test_density_plan_and_parameters_are_the_pinned_ones(name):
    rows, last, parameters = FAMILY_PLANS[name]
    model = build_density(name)
    described = describe(model)
    assert ladder_rows(described) == rows
    assert described["last_layer"]["sdn"] == (last is not None)
    assert described["last_layer"].get("directions") == last
    assert count_parameters(model) == parameters


@pytest.mark.parametrize("name", DENSITY_FAMILIES)
def test_density_modules_match_the_plan(name):
    model = build_density(name)
    for layer, plan in zip(model.ladder, describe(model)["ladder"], strict=True):
        if plan["sdn"]:
            assert isinstance(layer.down_a, ResSDNLayer) and isinstance(layer.down_b, ResSDNLayer)
            for half, dirs in zip((layer.down_a, layer.down_b), plan["directions"], strict=True):
                assert [c.direction for c in half.sdn.corrections] == dirs
                assert half.sdn.project_in.out_channels == plan["sdn_features"]
            upsampling_in = layer.down_b.sdn.project_in
        else:
            assert isinstance(layer.down_a, nn.Conv2d) and not isinstance(layer.down_b, ResSDNLayer)
            upsampling_in = layer.down_b
        assert isinstance(upsampling_in, nn.ConvTranspose2d) == plan["downsample"]


def test_direction_cycle_on_a_concrete_case():
    # 3 directions per sweep set: the counter wraps inside and across layers, then the last layer
    cfg = density_config(depth=3, ds_list=[], sdn_num_dirs=3)
    described = describe(DensityVAE(cfg))
    assert [layer["directions"] for layer in described["ladder"]] == [
        [[0, 1, 2], [3, 0, 1]], [[2, 3, 0], [1, 2, 3]], [[0, 1, 2], [3, 0, 1]],
    ]
    assert described["last_layer"]["directions"] == [2, 3, 0, 1]


def test_layers_outside_the_sdn_range_take_no_directions():
    # 8x8 images, SDN only at scale <= 4: layer 0 (8x8) is a conv, the last layer too
    cfg = density_config(depth=3, ds_list=[0], sdn_max_scale=4)
    described = describe(DensityVAE(cfg))
    assert [layer["sdn"] for layer in described["ladder"]] == [False, True, True]
    assert [layer["directions"] for layer in described["ladder"]] == [None, [[0], [1]], [[2], [3]]]
    assert described["last_layer"] == {"sdn": False}


def test_feature_reduction_only_after_downsampling_sdn_layers():
    described = describe(DensityVAE(density_config(**DENSITY_FAMILIES["feature-reduction"])))
    assert [layer["scale"] for layer in described["ladder"]] == [16, 8, 4, 2]
    assert [layer["sdn_features"] for layer in described["ladder"]] == [None, 54, 51, 50]


def test_28x28_images_are_padded_to_32():
    model = build_density("bernoulli-28x28-padded")
    assert [layer["scale"] for layer in describe(model)["ladder"]] == [32, 16, 8]
    x = model.obs.preprocess(images_for(model.cfg))
    assert [tuple(z.shape[2:]) for z in model.encode(x)] == [(8, 8), (8, 8), (16, 16)]
    assert model.sample(2, 1.0).shape == (2, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Density model: forward, backward, sampling, decoding, encoding


@pytest.mark.parametrize("name", DENSITY_FAMILIES)
def test_density_forward_backward(name):
    model = build_density(name)
    cfg = model.cfg
    x = model.obs.preprocess(images_for(cfg, batch=3))
    out = model(x)
    assert set(out) == {"log_px", "kl", "kl_layers", "kl_obj", "elbo", "loss", "z"}
    for key in ("log_px", "kl", "kl_obj", "elbo", "loss"):
        assert out[key].shape == (3,) and torch.isfinite(out[key]).all(), key
    assert len(out["kl_layers"]) == len(out["z"]) == cfg.depth
    # latents top layer first, each at its layer's map size after downsampling
    plans = describe(model)["ladder"][::-1]
    sizes = [p["scale"] // 2 if p["downsample"] else p["scale"] for p in plans]
    assert [tuple(z.shape) for z in out["z"]] == [(3, cfg.z_size, s, s) for s in sizes]

    out["loss"].mean().backward()
    top_up_b = f"ladder.{cfg.depth - 1}.up_b."
    for param_name, param in model.named_parameters():
        if param_name.startswith(top_up_b):
            # The top layer's bottom-up output is never used (as released): no gradient.
            assert param.grad is None, param_name
        else:
            assert param.grad is not None, param_name
            assert torch.isfinite(param.grad).all(), param_name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", DENSITY_FAMILIES)
def test_density_sample_decode_encode(name):
    model = build_density(name)
    cfg = model.cfg
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    sample = model.sample(3, temperature=0.8)
    assert sample.shape == (3, *shape)
    assert_on_data_grid(model, sample)

    x = model.obs.preprocess(images_for(cfg, batch=2))
    latents = model.encode(x)
    assert len(latents) == cfg.depth and all(z.shape[0] == 2 for z in latents)
    decoded = model.decode(latents)
    assert decoded.shape == (2, *shape)
    assert_on_data_grid(model, decoded)
    # with every latent given, the temperature has nothing left to draw
    assert torch.equal(model.decode(latents, temperature=1.0), decoded)
    drawn = model.decode(latents, sample_pixels=True)
    assert drawn.shape == (2, *shape)
    assert_on_data_grid(model, drawn)


def record_latents(model: DensityVAE, monkeypatch) -> list[Tensor]:
    """Make each ladder layer's `down` report the latent it used (top layer first)."""
    used = []
    for layer in reversed(model.ladder):
        down = layer.down

        def recording(*args, _down=down, **kwargs):
            result = _down(*args, **kwargs)
            used.append(result[1])
            return result

        monkeypatch.setattr(layer, "down", recording)
    return used


def test_decode_from_partially_given_latents(monkeypatch):
    model = build_density("iaf-dml-sdn")
    latents = model.encode(model.obs.preprocess(images_for(model.cfg)))
    used = record_latents(model, monkeypatch)
    given = [latents[0], None, latents[2]]

    torch.manual_seed(1)
    first = model.decode(given, temperature=0.0)
    first_used = list(used)
    used.clear()
    torch.manual_seed(2)
    second = model.decode(given, temperature=0.0)
    assert torch.equal(first, second)
    assert torch.equal(first_used[0], latents[0]) and torch.equal(first_used[2], latents[2])
    assert torch.equal(first_used[1], used[1])  # the prior mean at temperature 0

    used.clear()
    model.decode(given, temperature=1.0)
    assert torch.equal(used[0], latents[0]) and torch.equal(used[2], latents[2])
    assert not torch.equal(used[1], first_used[1])  # drawn

    used.clear()
    model.decode(latents[:1], temperature=0.0)  # a short list: the rest from the prior
    assert len(used) == 3 and torch.equal(used[0], latents[0])
    assert torch.equal(used[1], first_used[1])


def test_decode_needs_a_batch_size_without_latents():
    model = DensityVAE(density_config())
    with pytest.raises(ValueError, match="batch"):
        model.decode([None, None, None])
    assert model.decode([None, None, None], batch=2).shape == (2, 3, 8, 8)


def test_wrong_image_shape_is_a_clear_error():
    model = DensityVAE(density_config())
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 16, 16))
    beta_vae = DisentanglementVAE(beta_vae_config())
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        beta_vae(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["iaf-dml-sdn", "isogaussian-dl-cnn", "bernoulli-28x28-padded"])
def test_density_sampling_at_temperature_zero_is_deterministic(name):
    model = build_density(name)
    torch.manual_seed(1)
    first = model.sample(3, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(model.sample(3, temperature=0.0), first)
    # the same seeds do give different draws at temperature 1
    torch.manual_seed(1)
    one = model.decode([], temperature=1.0, batch=3, sample_pixels=True)
    torch.manual_seed(2)
    assert not torch.equal(model.decode([], temperature=1.0, batch=3, sample_pixels=True), one)


# ---------------------------------------------------------------------------------------------
# Density model: the objective


def test_free_bits_objective_is_the_spec_formula_per_layer():
    cfg = density_config(post_model="IAF", depth=4, ds_list=[1, 2])
    model = DensityVAE(cfg)
    x = model.obs.preprocess(images_for(cfg, batch=5))
    torch.manual_seed(3)
    means = [kl.mean().item() for kl in model(x)["kl_layers"]]
    cfg.free_bits = (min(means) + max(means)) / 2  # some layers lifted, some not
    assert min(means) < cfg.free_bits < max(means)

    torch.manual_seed(3)
    out = model(x)
    expected = sum(
        kl + (max(kl.mean().item(), cfg.free_bits) - kl.mean().item()) / kl.shape[0]
        for kl in out["kl_layers"]
    )
    torch.testing.assert_close(out["kl_obj"], expected)
    torch.testing.assert_close(out["kl"], torch.stack(out["kl_layers"]).sum(0))
    torch.testing.assert_close(out["elbo"], out["log_px"] - out["kl"])
    torch.testing.assert_close(out["loss"], -(out["log_px"] - out["kl_obj"]))
    assert not torch.allclose(out["kl_obj"], out["kl"])


def test_free_bits_zero_leaves_the_kl_unchanged():
    model = DensityVAE(density_config(free_bits=0.0))
    out = model(model.obs.preprocess(images_for(model.cfg, batch=4)))
    assert all(kl.mean() > 0 for kl in out["kl_layers"])
    torch.testing.assert_close(out["kl_obj"], out["kl"])


def test_bits_per_dim():
    assert bits_per_dim(3 * 8 * 8 * math.log(2.0) * 2.5, 3 * 8 * 8) == pytest.approx(2.5)
    # a sum over 4 images gives their mean
    assert bits_per_dim(4 * 3 * 8 * 8 * math.log(2.0) * 2.5, 3 * 8 * 8, images=4) == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------
# β-VAE


@pytest.mark.parametrize("name", BETA_VAE_FAMILIES)
def test_beta_vae_structure_is_the_pinned_one(name):
    plan, parameters = BETA_VAE_PLANS[name]
    model = build_beta_vae(name)
    assert count_parameters(model) == parameters
    stages = describe(model)["decoder_stages"]
    assert [stage["scale"] for stage in stages] == [8, 16, 32, 64]
    assert [stage["sdn"] for stage in stages] == [entry is not None for entry in plan]
    upsamplers = [m for m in model.decoder if isinstance(m, (SDNLayer, nn.ConvTranspose2d))]
    assert [isinstance(m, SDNLayer) for m in upsamplers] == [entry is not None for entry in plan]
    for stage, layer, entry in zip(stages, upsamplers, plan, strict=True):
        if entry is not None:
            features, dirs = entry
            assert stage["directions"] == [c.direction for c in layer.corrections] == dirs
            assert stage["sdn_features"] == layer.project_in.out_channels == features


def test_beta_vae_directions_cycle_across_stages():
    stages = describe(DisentanglementVAE(beta_vae_config(**BETA_VAE_FAMILIES["sdn-everywhere"])))
    assert [s["directions"] for s in stages["decoder_stages"]] == [[0, 1], [2, 3], [0, 1], [2, 3]]


@pytest.mark.parametrize("name", BETA_VAE_FAMILIES)
def test_beta_vae_forward_backward_sample_decode_encode(name):
    model = build_beta_vae(name)
    cfg = model.cfg
    x = model.obs.preprocess(images_for(cfg, batch=2))
    out = model(x)
    assert set(out) == {"log_px", "kl", "elbo", "z"}
    assert out["z"].shape == (2, cfg.z_size)
    for key in ("log_px", "kl", "elbo"):
        assert out[key].shape == (2,) and torch.isfinite(out[key]).all(), key
    torch.testing.assert_close(out["elbo"], out["log_px"] - out["kl"])
    # β anneals by optimizer step: β_final·β_rate after the first update, then up to β_final
    model.cfg = dataclasses.replace(cfg, beta_final=2.0, beta_rate=0.125)
    for step, beta in ((0, 0.25), (1, 0.5), (10**6, 2.0)):
        torch.testing.assert_close(model.loss(out, step), -(out["log_px"] - beta * out["kl"]))
    model.loss(out, 1).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name

    codes = model.encode(x)
    assert codes.shape == (2, cfg.z_size)
    mean, _ = model.posterior_params(x)
    torch.testing.assert_close(codes, mean)
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 64, 64)
    assert_on_data_grid(model, decoded)
    assert torch.equal(model.decode(codes), decoded)
    noisy = model.decode(codes, temperature=1.0)
    assert noisy.shape == (2, 3, 64, 64) and not torch.equal(noisy, decoded)
    assert_on_data_grid(model, noisy)
    sample = model.sample(3, temperature=0.85)
    assert sample.shape == (3, 3, 64, 64)
    assert_on_data_grid(model, sample)


def test_beta_vae_sampling_at_temperature_zero_is_deterministic():
    model = build_beta_vae("sdn-at-16")
    torch.manual_seed(1)
    first = model.sample(2, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(model.sample(2, temperature=0.0), first)
    torch.testing.assert_close(first, model.decode(torch.zeros(2, model.cfg.z_size)))
    torch.manual_seed(1)
    warm = model.sample(2, temperature=1.0)
    torch.manual_seed(2)
    assert not torch.equal(model.sample(2, temperature=1.0), warm)


@pytest.mark.parametrize(("beta_final", "beta_rate"), [(1.0, 1.0), (4.0, 0.005), (0.5, 0.3), (2.0, 0.07)])
def test_beta_schedule_follows_the_recursion(beta_final, beta_rate):
    beta = 0.0
    assert beta_schedule(0, beta_final, beta_rate) == 0.0
    for step in range(1, 400):
        beta = min(beta_final, beta + beta_rate * beta_final)
        assert beta_schedule(step, beta_final, beta_rate) == pytest.approx(beta, rel=1e-9, abs=1e-12)
    assert beta_schedule(10**6, beta_final, beta_rate) == beta_final


# ---------------------------------------------------------------------------------------------
# Overfitting one fixed batch


def bits_per_dim_of(model: nn.Module, x: Tensor, loss_fn) -> float:
    """The training loss in bits/dim, averaged over a few posterior draws with fixed seeds."""
    losses = []
    with torch.no_grad():
        for draw in range(4):
            torch.manual_seed(draw)
            losses.append(loss_fn(model(x)).mean().item())
    return sum(losses) / len(losses) / (model.dims_per_image * math.log(2.0))


def overfit(model: nn.Module, x: Tensor, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    before = bits_per_dim_of(model, x, loss_fn)
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x)).mean().backward()
        optimizer.step()
    return before, bits_per_dim_of(model, x, loss_fn)


def test_density_model_overfits_one_batch():
    cfg = density_config(h_size=16, depth=2, ds_list=[0], sdn_max_scale=4, sdn_nfeat_0=8)
    model = prepare_model(DensityVAE(cfg), TrainConfig())
    x = model.obs.preprocess(structured_images(4, 8))
    before, after = overfit(model, x, lambda out: out["loss"], steps=300, lr=0.01)
    assert after < 0.7 * before, (before, after)


def test_beta_vae_overfits_one_batch():
    model = build_beta_vae("sdn-at-8")
    x = model.obs.preprocess(structured_images(4, 64))
    # lr 0.02 throws the encoder's N(0, 0.02) Linear weights (the release's init) out of range
    # in one Adamax step; the release trains this model at 0.001
    before, after = overfit(model, x, lambda out: model.loss(out, 0), steps=200, lr=0.01)
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# prepare_model: orthogonal init, then weight norm (per output channel) on every convolution


@pytest.mark.parametrize("model_fn", [lambda: DensityVAE(density_config(post_model="IAF")),
                                      lambda: DisentanglementVAE(beta_vae_config(sdn_max_scale=64))])
def test_prepare_model_orthogonal_then_weight_norm(model_fn):
    model = prepare_model(model_fn(), TrainConfig())
    convs = [m for m in model.modules() if isinstance(m, CONVS)]
    assert any(isinstance(m, nn.ConvTranspose2d) for m in convs)
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        weight_norm = conv.parametrizations.weight
        assert type(weight_norm[0]).__name__ == "_WeightNorm"
        gain, direction = weight_norm.original0, weight_norm.original1
        gain_shape = [1, 1, 1, 1]
        gain_shape[1 if isinstance(conv, nn.ConvTranspose2d) else 0] = conv.out_channels
        assert gain.shape == tuple(gain_shape) and direction.shape == conv.weight.shape
        rows = conv.weight.detach().flatten(1)
        gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
        torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-4, rtol=0)
        assert conv.bias.abs().max() > 0  # PyTorch's default bias init is kept
    for module in model.modules():
        if not isinstance(module, CONVS):
            assert not parametrize.is_parametrized(module)


def test_prepare_model_can_skip_init_and_weight_norm():
    model = prepare_model(DensityVAE(density_config()), TrainConfig(init="default", weight_norm=False))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize(
    ("conv_name", "mask_type"), [("ar_input", "A"), ("ar_hidden", "B"), ("ar_output", "B")]
)
def test_iaf_masks_survive_weight_norm(conv_name, mask_type):
    model = prepare_model(DensityVAE(density_config(post_model="IAF")), TrainConfig())
    conv = getattr(model.ladder[0].posterior, conv_name)
    assert isinstance(conv, MaskedConv2d) and parametrize.is_parametrized(conv, "weight")
    with torch.no_grad():  # make every weight count, so a leak through the mask would show
        conv.parametrizations.weight.original1.add_(1.0)
    size = 5
    for h in range(size):
        for w in range(size):
            x = torch.randn(1, conv.in_channels, size, size, requires_grad=True)
            conv(x)[0, :, h, w].sum().backward()
            seen = x.grad.abs().sum(1)[0].flatten() > 0
            position = h * size + w
            visible = torch.arange(size * size) < position + (mask_type == "B")
            assert not seen[~visible].any(), (h, w)
            if mask_type == "B":
                assert seen[position]
            elif w > 0:
                assert seen[position - 1]  # the left neighbour


# ---------------------------------------------------------------------------------------------
# EMA with a real Lightning Trainer


def tiny_experiment(ema_coef: float = 0.7):
    params = copy.deepcopy(PARAMS)
    params["datasets"]["photos32"]["image_size"] = 8
    experiment = detach(params, "photos32-sdn")
    experiment["model"].update(
        h_size=8, depth=2, ds_list=[1], sdn_max_scale=8, sdn_min_scale=0, sdn_nfeat_0=4, sdn_num_dirs=1,
        mix_components=2, post_model="IAF",
    )
    experiment["train"].update(batch_size=4, lr=0.01, ema_coef=ema_coef)
    return experiment_config(params, "photos32-sdn")


class WeightRecorder(pl.Callback):
    """Raw and EMA weights when training starts and after every optimizer step."""

    def __init__(self):
        self.start = None
        self.raw, self.ema = [], []

    def on_train_start(self, trainer, module):
        self.start = (snapshot(module.model), snapshot(module.ema))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.raw.append(snapshot(module.model))
        self.ema.append(snapshot(module.ema))


class ValidationRecorder(pl.Callback):
    """The generator state and batch right before each validation step (to replay it)."""

    def __init__(self):
        self.steps = []

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.steps.append((torch.get_rng_state(), batch[0].clone()))


TRAIN_IMAGES = torch.randint(
    0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
)


def fit(cfg, max_steps: int, ckpt_path: Path | None = None, init_seed: int | None = None, callbacks=()):
    pl.seed_everything(cfg.seed if init_seed is None else init_seed, verbose=False)
    module = VAEModule(cfg)
    sampler = StepBatchSampler(len(TRAIN_IMAGES), cfg.train.batch_size, cfg.seed, total=max_steps)
    if ckpt_path is not None:  # as train_experiment does
        sampler.start = torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, deterministic=True, callbacks=list(callbacks),
    )
    loader = DataLoader(TensorDataset(TRAIN_IMAGES), batch_sampler=sampler)
    trainer.fit(module, loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return module, trainer


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    recorder, validation = WeightRecorder(), ValidationRecorder()
    cfg = tiny_experiment()
    module, trainer = fit(cfg, max_steps=4, callbacks=[recorder, validation])
    return cfg, module, trainer, recorder, validation


def test_ema_is_the_exponential_average_of_the_raw_weights(trained):
    cfg, module, _, recorder, _ = trained
    coef = cfg.train.ema_coef
    raw_start, ema_start = recorder.start
    for raw, ema in zip(raw_start, ema_start, strict=True):
        assert torch.equal(raw, ema)
    expected = ema_start
    assert len(recorder.raw) == 4
    for raw_step, ema_step in zip(recorder.raw, recorder.ema, strict=True):
        expected = [coef * e + (1 - coef) * r for e, r in zip(expected, raw_step, strict=True)]
        for got, want in zip(ema_step, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(r, s) for r, s in zip(recorder.raw[-1], raw_start, strict=True))
    assert any(not torch.allclose(r, e) for r, e in zip(recorder.raw[-1], recorder.ema[-1], strict=True))
    assert all(not p.requires_grad for p in module.ema.parameters())


def replay_validation(model: nn.Module, steps) -> float:
    """Validation's neg-ELBO in bits/dim, recomputed with `model` from the recorded states."""
    total, count = 0.0, 0
    with torch.no_grad():
        for state, images in steps:
            torch.set_rng_state(state)
            total += -model(model.obs.preprocess(images))["elbo"].double().sum().item()
            count += len(images)
    return total / (count * model.dims_per_image * math.log(2.0))


def test_validation_uses_the_ema_weights(trained):
    _, module, trainer, _, validation = trained
    validation.steps.clear()
    val_images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    trainer.validate(module, DataLoader(TensorDataset(val_images), batch_size=4), verbose=False)
    assert len(validation.steps) == 2
    reported = module.val_rows[-1]["neg_elbo_bpd"]
    assert module.val_rows[-1]["images"] == 8
    assert float(trainer.callback_metrics["val/neg_elbo_bpd"]) == pytest.approx(reported, rel=1e-6)
    with_ema = replay_validation(module.ema, validation.steps)
    with_raw = replay_validation(module.model, validation.steps)
    assert reported == pytest.approx(with_ema, rel=1e-5)
    assert abs(with_raw - with_ema) > 1e-3 * with_ema


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_trains_the_raw_weights_and_restores_the_ema(tmp_path):
    cfg = tiny_experiment()
    uninterrupted, _ = fit(cfg, max_steps=6)
    first, trainer = fit(cfg, max_steps=3)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    saved_raw = [state[f"model.{name}"] for name, _ in first.model.named_parameters()]
    saved_ema = [state[f"ema.{name}"] for name, _ in first.ema.named_parameters()]
    assert any(not torch.allclose(r, e) for r, e in zip(saved_raw, saved_ema, strict=True))

    recorder = WeightRecorder()
    resumed, _ = fit(cfg, max_steps=6, ckpt_path=ckpt, init_seed=cfg.seed + 1, callbacks=[recorder])
    raw_start, ema_start = recorder.start
    for got, want in zip(raw_start + ema_start, saved_raw + saved_ema, strict=True):
        assert torch.equal(got, want)
    # the first resumed step moves the raw weights and averages them into the restored EMA
    coef = cfg.train.ema_coef
    for ema, saved, raw in zip(recorder.ema[0], saved_ema, recorder.raw[0], strict=True):
        torch.testing.assert_close(ema, coef * saved + (1 - coef) * raw, rtol=1e-5, atol=1e-6)
    assert len(recorder.raw) == 3
    # same data, same noise, same optimiser state: the uninterrupted run's weights
    for got, want in zip(snapshot(resumed.model), snapshot(uninterrupted.model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(snapshot(resumed.ema), snapshot(uninterrupted.ema), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every experiment of params.yaml, built on the meta device (no memory, no init): plan and size

@pytest.mark.parametrize("name", list(PARAMS["experiments"]))
def test_every_experiment_has_the_pinned_size(name):
    built, trained = PAPER_PARAMETERS[name]
    cfg = experiment_config(PARAMS, name)
    assert count_parameters(build_on_meta(cfg)) == built
    assert count_parameters(build_on_meta(cfg, prepared=True)) == trained


def distinct_models() -> list[str]:
    """One experiment per distinct network (the showcase and the release's checkpoint share theirs)."""
    seen, names = set(), []
    for name in PARAMS["experiments"]:
        cfg = experiment_config(PARAMS, name)
        network = json.dumps([dataclasses.asdict(cfg.model), cfg.train.weight_norm], sort_keys=True)
        if network not in seen:
            seen.add(network)
            names.append(name)
    return names


@pytest.mark.parametrize("name", distinct_models())
def test_every_experiment_trains_and_samples_at_full_size_on_the_meta_device(name):
    # A shape that only breaks at paper scale, or a tensor made on the wrong device, should not
    # first show on a GPU. Only the model is built under the meta device: its forward, backward
    # and sampling run outside it, so a tensor the model made without a device would be a CPU
    # tensor and clash with the meta ones.
    cfg = experiment_config(PARAMS, name)
    model = build_on_meta(cfg, prepared=True)
    size, channels = cfg.model.image_size, cfg.model.channels
    images = torch.empty(cfg.train.batch_size, channels, size, size, dtype=torch.uint8, device="meta")
    loss = model.loss(model(model.obs.preprocess(images)), step=0).mean()
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    top_up = f"ladder.{getattr(cfg.model, 'depth', 0) - 1}.up_b."  # the top layer's bottom-up output,
    assert all(name.startswith(top_up) for name in unused), unused  # which the loss ignores as released
    grads = [(p.grad, p) for p in model.parameters() if p.grad is not None]
    assert all(g.device.type == "meta" and g.shape == p.shape for g, p in grads)
    with torch.no_grad():
        samples = model.sample(2, temperature=0.8)
    assert samples.device.type == "meta" and samples.shape == (2, channels, size, size)


DENSITY_RUNS = [name for name in PARAMS["experiments"] if dataset_of(PARAMS, name) in PAPER_LADDERS]


@pytest.mark.parametrize("name", DENSITY_RUNS)
def test_density_experiments_have_the_pinned_ladders(name):
    kind = name.rsplit("-", 1)[1]
    run = dataset_of(PARAMS, name)
    described = describe(build_on_meta(experiment_config(PARAMS, name)))
    sdn = kind != "cnn"
    assert ladder_rows(described) == paper_rows(run, sdn)
    last = PAPER_LADDERS[run]["last"] if sdn else None
    assert described["last_layer"].get("directions") == last
    assert described["last_layer"]["sdn"] == (last is not None)


@pytest.mark.parametrize(("name", "stages"), [
    ("sprites-sdn", [None, (32, [0]), None, None]), ("sprites-cnn", [None] * 4),
    ("3dshapes-sdn", [None, None, (200, [0]), None]), ("3dshapes-cnn", [None] * 4),
])
def test_beta_vae_experiments_have_the_pinned_decoders(name, stages):
    described = describe(build_on_meta(experiment_config(PARAMS, name)))["decoder_stages"]
    assert [stage["scale"] for stage in described] == [8, 16, 32, 64]
    found = [(s["sdn_features"], s["directions"]) if s["sdn"] else None for s in described]
    assert found == stages


def test_cifar10_parameters_part_by_part():
    model = build_on_meta(experiment_config(PARAMS, "cifar10-sdn"), prepared=True)
    parts = CIFAR10_SDN_PARTS
    assert count_parameters(model.first_layer) == parts["first_layer"]
    assert model.top.numel() == parts["top"]
    assert [count_parameters(layer) for layer in model.ladder] == parts["ladder"]
    assert count_parameters(model.last_layer) == parts["last_layer"]
    # the parts add up to the published total: nothing else holds parameters
    total = parts["first_layer"] + parts["top"] + sum(parts["ladder"]) + parts["last_layer"]
    assert total == count_parameters(model) == 121_486_444


# ---------------------------------------------------------------------------------------------
# python -m sdn info


def test_info_reports_the_model(capsys):
    assert sdn_main(["info", "photos32-sdn"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == PAPER_PARAMETERS["photos32-sdn"][1]
    assert ladder_rows(result) == paper_rows("photos32", sdn=True)
    assert result["last_layer"] == {"sdn": False}


def test_info_reports_the_beta_vae(capsys):
    assert sdn_main(["info", "sprites-sdn"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = experiment_config(PARAMS, "sprites-sdn")
    assert not cfg.train.weight_norm  # the release's β-VAE regime
    assert result["parameters"] == PAPER_PARAMETERS["sprites-sdn"][1]
    assert [stage["scale"] for stage in result["decoder_stages"]] == [8, 16, 32, 64]


def test_info_unknown_experiment(capsys):
    assert sdn_main(["info", "cifar10-sdm"]) == 2
    assert "Did you mean 'cifar10-sdn'" in capsys.readouterr().err


def test_info_cifar10_builds_the_paper_network():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # orthogonal init is slow on busy shared cores
    done = subprocess.run(
        [sys.executable, "-m", "sdn", "info", "cifar10-sdn"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result["parameters"], int)
    # docs/maths.md#paper-runs: depth 15, ds_list 5 10, F 360 / diff 128, 2 directions, 32x32
    assert ladder_rows(result) == paper_rows("cifar10", sdn=True)
    assert result["last_layer"] == {"sdn": True, "sdn_features": 360, "directions": [0, 1, 2, 3]}
    assert result["parameters"] == 121_486_444  # docs/maths.md#paper-runs
