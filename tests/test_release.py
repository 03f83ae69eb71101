"""The authors' checkpoints: a checkpoint written here in the release's format (Lightning 0.9's
`ModelCheckpoint` dict, the release's module names, weight-norm hooks and EMA slots, derived from
its lib/DensityVAE.py, lib/nn.py, lib/probability.py and lib/utils.py) loads safely, maps every
tensor, and scores images as the release's equations do."""

import copy
import math
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sdn.config import experiment_config
from sdn.errors import ChecksumError, ConfigError, ReleaseCheckpointError
from sdn.params import load_params
from sdn.release import import_release, load_release_checkpoint, read_release_checkpoint
from sdn.training.checkpoints import LAST_CHECKPOINT
from sdn.training.module import load_ema_model

ROOT = Path(__file__).resolve().parents[1]

# Tiny models of the release's CIFAR10 (32x32) images.
# CNN only: first layer 32x32 -> 16x16 (downsample_first), layer 1 downsamples to 8x8.
CNN = dict(z_size=2, h_size=6, depth=3, ds_list=[1], downsample_first=True, sdn_max_scale=0,
           sdn_min_scale=0, sdn_nfeat_0=0, sdn_nfeat_diff=0, sdn_num_dirs=0, post_model="IAF",
           prior_model="IsoGaussian", obs_model="DML", mix_components=2, nbits=5, free_bits=0.01)
# SDN in both ladder layers (32x32) and in the last layer.
SDN = dict(z_size=2, h_size=4, depth=2, ds_list=[1], downsample_first=False, sdn_max_scale=32,
           sdn_min_scale=0, sdn_nfeat_0=5, sdn_nfeat_diff=0, sdn_num_dirs=2, post_model="IsoGaussian",
           prior_model="IsoGaussian", obs_model="DL", mix_components=1, nbits=8, free_bits=0.0)
IMAGE_SIZE = 32  # the release's CIFAR10

# `make test` runs these under make: --no-print-directory keeps the nested make from adding
# "Entering/Leaving directory" lines to the output the tests read.
MAKE = ("make", "--no-print-directory")


# ---------------------------------------------------------------------------------------------
# Writing pickles as Lightning 0.9 under Python 3.8 / torch 1.6-1.7 wrote them


class Global:
    """A reference written as a GLOBAL opcode whatever is installed here (Lightning 0.9 is not)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # the pickler's save_reduce wants a callable
        raise AssertionError("never called")


GETATTR = Global("__builtin__", "getattr")  # protocol 2 writes builtins under their Python 2 name
TRAINER = Global("pytorch_lightning.trainer.trainer", "Trainer")


class FunctionReference:
    """`Trainer._gpus_arg_default`: a function defined in a class body. Protocol 2 cannot name it
    in one GLOBAL, so Python's pickler writes `getattr(Trainer, '_gpus_arg_default')`."""

    def __init__(self, attribute: str = "_gpus_arg_default") -> None:
        self.attribute = attribute


class LightningAttributeDict(dict):
    """What Lightning 0.9 stores as `hyper_parameters` when omegaconf is installed."""


class LegacyPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_attribute_dict(self, obj: LightningAttributeDict) -> None:
        # a dict subclass at protocol 2: class, NEWOBJ, then its items
        self.save(Global("pytorch_lightning.utilities.parsing", "AttributeDict"))
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        self._batch_setitems(iter(obj.items()))

    dispatch[Global] = _save_global
    dispatch[LightningAttributeDict] = _save_attribute_dict

    def reducer_override(self, obj):
        if isinstance(obj, FunctionReference):
            return GETATTR, (TRAINER, obj.attribute)
        return NotImplemented


LEGACY_PICKLE = types.SimpleNamespace(__name__="legacy_pickle", Pickler=LegacyPickler)


# ---------------------------------------------------------------------------------------------
# The release's state_dict layout


def conv_entries(prefix: str, cin: int, cout: int, k: int, transposed: bool = False) -> list:
    """A conv after the release's WN: bias, then weight_g and weight_v (the hook re-registers the
    weight); the norm is per output channel, dim 0 for Conv2d, dim 1 for ConvTranspose2d."""
    g = (1, cout, 1, 1) if transposed else (cout, 1, 1, 1)
    v = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    return [(prefix + "bias", (cout,)), (prefix + "weight_g", g), (prefix + "weight_v", v)]


def masked_entries(prefix: str, cin: int, cout: int, mask_type: str) -> list:
    return conv_entries(prefix, cin, cout, 3) + [(prefix + "mask", ("mask", mask_type, cout, cin))]


def res_sdn_entries(prefix: str, cin: int, cout: int, features: int, dirs: int, k: int, up: bool,
                    old_names: bool) -> list:
    project_in, corrections, project_out = (
        ("pre_cnn", "sdn_update_network", "post_cnn") if old_names
        else ("project_in_stage", "sdn_correction_stage", "project_out_stage")
    )
    entries = conv_entries(f"{prefix}sdn.{project_in}.", cin, features, k, up)
    for j in range(dirs):
        gru = f"{prefix}sdn.{corrections}.{j}.cell.gru."
        entries += [(gru + "weight_ih", (3 * features, 3 * features)),
                    (gru + "weight_hh", (3 * features, features)),
                    (gru + "bias_ih", (3 * features,)), (gru + "bias_hh", (3 * features,))]
    entries += conv_entries(f"{prefix}sdn.{project_out}.", features, 2 * cout, 1)
    return entries + conv_entries(f"{prefix}cnn.", cin, cout, k, up)


def release_layout(hp: dict, old_names: bool = False) -> list:
    """(key, shape) of DensityVAE.state_dict() before the EMA module: `h` (a parameter of the
    module itself), obs_model, first_layer, ladder_layers (post_model registered first), last_layer."""
    h, z, channels = hp["h_size"], hp["z_size"], 3
    context = max(100 // z, 1) * z
    q_size = 2 * z + context if hp["post_model"] == "IAF" else 2 * z
    obs_size = hp["mix_components"] * 10 if hp["obs_model"] == "DML" else channels
    k0 = 4 if hp["downsample_first"] else 3
    entries = [("h", (h,))]
    if hp["obs_model"] == "DL":
        entries.append(("obs_model.logscale", (1,)))
    entries += conv_entries("first_layer.0.", channels, h, k0)
    scale = IMAGE_SIZE // 2 if hp["downsample_first"] else IMAGE_SIZE
    features = hp["sdn_nfeat_0"]
    for i in range(hp["depth"]):
        prefix = f"ladder_layers.{i}."
        down = i in hp["ds_list"] and scale > 1
        use_sdn = hp["sdn_max_scale"] >= scale >= hp["sdn_min_scale"]
        k = 4 if down else 3
        if hp["post_model"] == "IAF":
            arnn = prefix + "post_model.arnn."
            entries += masked_entries(arnn + "conv_a.", z, context, "A")
            entries += masked_entries(arnn + "conv_b.1.", context, context, "B")
            entries += masked_entries(arnn + "conv_b.3.", context, 2 * z, "B")
        entries += conv_entries(prefix + "up_a.", h, h + q_size, k)
        entries += conv_entries(prefix + "up_b.", h, 2 * h, 3)
        if use_sdn:
            dirs = hp["sdn_num_dirs"]
            entries += res_sdn_entries(prefix + "down_a.", h, h + q_size + 2 * z, features, dirs, 3, False,
                                       old_names)
            entries += res_sdn_entries(prefix + "down_b.", h + z, 2 * h, features, dirs, k, down, old_names)
        else:
            entries += conv_entries(prefix + "down_a.", h, h + q_size + 2 * z, 3)
            entries += conv_entries(prefix + "down_b.", h + z, 2 * h, k, transposed=down)
        if down:
            scale //= 2
            if use_sdn:
                features = max(50, features - hp["sdn_nfeat_diff"])
    if hp["sdn_max_scale"] >= IMAGE_SIZE:
        entries += res_sdn_entries("last_layer.2.", h, obs_size, hp["sdn_nfeat_0"], 4, k0,
                                   hp["downsample_first"], old_names)
    else:
        entries += conv_entries("last_layer.2.", h, obs_size, k0, transposed=hp["downsample_first"])
    return entries


def release_mask(mask_type: str, cout: int, cin: int) -> torch.Tensor:
    """lib/utils.py's MaskedConv2d: the weight's shape, zero from the centre (A) or after it (B)."""
    mask = torch.ones(cout, cin, 3, 3)
    mask[:, :, 1, 1 + (mask_type == "B"):] = 0
    mask[:, :, 2:] = 0
    return mask


def release_state(hp: dict, old_names: bool = False, seed: int = 0) -> OrderedDict:
    """The raw weights, then `ema.shadow_params.<name with '^'>` for every parameter (not the
    masks, which are buffers); every tensor distinct, the EMA ones near the raw ones."""
    generator = torch.Generator().manual_seed(seed)
    state, ema = OrderedDict(), OrderedDict()
    for key, shape in release_layout(hp, old_names):
        if shape[0] == "mask":
            state[key] = release_mask(*shape[1:])
            continue
        value = 0.3 * torch.randn(shape, generator=generator)
        if key.endswith("weight_g"):
            value = 0.5 + value.abs()
        state[key] = value
        averaged = value + 0.05 * torch.randn(shape, generator=generator)
        ema["ema.shadow_params." + key.replace(".", "^")] = averaged
    state.update(ema)
    state._metadata = OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() leaves it
    return state


def hyper_parameters(hp: dict, attribute_dict: bool = False, dotted: bool = False) -> dict:
    """train.py's argparse namespace as DensityVAE.save_hyperparameters() keeps it, with
    Lightning 0.9's own arguments (its `--tpu_cores` defaults to Trainer._gpus_arg_default)."""
    # dotted: the reference as one GLOBAL with the qualified name, as protocol 4 would name it
    function = Global(TRAINER.module, "Trainer._gpus_arg_default") if dotted else FunctionReference()
    values = dict(
        gpus=8, tpu_cores=function, num_nodes=1, precision=32, max_epochs=1000,
        check_val_every_n_epoch=2, distributed_backend="ddp", accumulate_grad_batches=1, logger=True,
        profiler=None, root="./data/", random_seed=1234, exp_name="SDN-Tiny_", task="density_estimation",
        dataset="CIFAR10", iters=1000000, amp=True, make_checkpoint=True, use_checkpoint=False,
        num_workers=16, figsize=20, sampling_temperature=0.85, evaluation_mode=False, profiler_mode=False,
        batch=4, batch_val=16, lrate=0.001, lrate_decay=0.999, ema_coef=0.999, beta_final=1, beta_rate=1,
        **hp,
    )
    return LightningAttributeDict(values) if attribute_dict else values


def release_checkpoint(hp: dict, old_names: bool = False, attribute_dict: bool = False, dotted: bool = False,
                       state: OrderedDict | None = None) -> dict:
    state = release_state(hp, old_names) if state is None else state
    return {
        "epoch": 42,
        "global_step": 1234,
        "pytorch-lightning_version": "0.9.0",
        "checkpoint_callback_best_model_score": torch.tensor(0.71),
        "checkpoint_callback_best_model_path": "/checkpoints/SDN-Tiny_/epoch=41.ckpt",
        "optimizer_states": [{
            "state": {0: {"step": 3, "exp_avg": torch.zeros(2), "exp_inf": torch.zeros(2)}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0,
                              "initial_lr": 0.001, "params": [0]}],
        }],
        "lr_schedulers": [{"gamma": 0.999, "base_lrs": [0.001], "last_epoch": 42, "_step_count": 43,
                           "_get_lr_called_within_step": False, "_last_lr": [0.00096]}],
        "state_dict": state,
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters(hp, attribute_dict, dotted),
    }


def write(checkpoint: dict, path: Path) -> Path:
    torch.save(checkpoint, path, pickle_module=LEGACY_PICKLE, pickle_protocol=2)
    return path


# ---------------------------------------------------------------------------------------------
# The release's equations, written out with plain torch ops on the checkpoint's tensors


def release_neg_elbo(state: dict, hp: dict, images: torch.Tensor, noise: list) -> torch.Tensor:
    """−ELBO per image of the CNN-only `hp` with the EMA weights (DensityVAE.forward, LadderLayer.up
    and .down, IAF.reparameterize, IsoGaussian.conditional_log_prob, DML.conditional_log_prob)."""
    def ema(key):
        return state["ema.shadow_params." + key.replace(".", "^")]

    def conv(x, name, stride=1, padding=1, transposed=False, mask=None):
        g, v = ema(name + ".weight_g"), ema(name + ".weight_v")
        keep = 1 if transposed else 0
        weight = g * v / v.pow(2).sum([d for d in range(4) if d != keep], keepdim=True).sqrt()
        if mask is not None:
            weight = weight * mask  # MaskedConv2d: weight.data *= mask before the conv
        op = F.conv_transpose2d if transposed else F.conv2d
        return op(x, weight, ema(name + ".bias"), stride, padding)

    h, z, depth, mix, nbits = hp["h_size"], hp["z_size"], hp["depth"], hp["mix_components"], hp["nbits"]
    context = max(100 // z, 1) * z
    # ToTensor, Quantize(nbits), Normalize(0.5, 0.5): levels to [-1, 1]
    x = torch.div(images.long(), 2 ** (8 - nbits), rounding_mode="floor").float() / (2**nbits - 1) * 2 - 1
    t = conv(x, "first_layer.0", 2, 1)
    q_ups, downs, scale = [], [], IMAGE_SIZE // 2
    for i in range(depth):
        down = i in hp["ds_list"] and scale > 1
        stride, padding = (2, 1) if down else (1, 1)
        out = conv(F.elu(t), f"ladder_layers.{i}.up_a", stride, padding)
        t_h, q_up = out.split([h, 2 * z + context], 1)
        t_h, gate = conv(F.elu(t_h), f"ladder_layers.{i}.up_b").chunk(2, 1)
        gate = torch.sigmoid(gate - 1)
        t = (1 - gate) * (F.interpolate(t, scale_factor=0.5) if down else t) + gate * t_h
        q_ups.append(q_up)
        downs.append(down)
        scale //= 2 if down else 1
    d = ema("h").view(1, -1, 1, 1).expand_as(t)
    kl = 0.0
    for i, eps in zip(reversed(range(depth)), noise, strict=True):
        out = conv(F.elu(d), f"ladder_layers.{i}.down_a")
        h_det, q_down, p_params = out.split([h, 2 * z + context, 2 * z], 1)
        mean, log_var, ctx = (q_ups[i] + q_down).split([z, z, context], 1)
        std = torch.exp(0.5 * log_var)
        z0 = mean + eps * std
        log_q = -torch.log(std) - 0.5 * math.log(2 * math.pi) - 0.5 * eps**2
        arnn = f"ladder_layers.{i}.post_model.arnn."
        a = conv(z0, arnn + "conv_a", mask=release_mask("A", context, z)) + ctx
        a = conv(F.elu(a), arnn + "conv_b.1", mask=release_mask("B", context, context))
        a = conv(F.elu(a), arnn + "conv_b.3", mask=release_mask("B", 2 * z, context))
        shift, log_sd = 0.1 * a[:, :z], 0.1 * a[:, z:]
        sample = (z0 - shift) / torch.exp(log_sd)
        log_q = log_q + log_sd
        prior_mean, prior_log_var = p_params.chunk(2, 1)
        log_p = torch.distributions.Normal(prior_mean, torch.exp(0.5 * prior_log_var)).log_prob(sample)
        kl = kl + (log_q - log_p).flatten(1).sum(1)
        stride, padding = (2, 1) if downs[i] else (1, 1)
        out = conv(F.elu(torch.cat([sample, h_det], 1)), f"ladder_layers.{i}.down_b", stride, padding,
                   transposed=downs[i])
        t_h, gate = out.chunk(2, 1)
        gate = torch.sigmoid(gate - 1)
        d = (1 - gate) * (F.interpolate(d, scale_factor=2.0) if downs[i] else d) + gate * t_h
    params = conv(F.elu(d), "last_layer.2", 2, 1, transposed=True)
    return -(release_dml(params, x, mix, nbits) - kl)


def release_dml(params: torch.Tensor, x: torch.Tensor, mix: int, nbits: int) -> torch.Tensor:
    """DML.conditional_log_prob: channels last, per channel [means, log-scales, coefficients]."""
    binsize = 1 / (2**nbits - 1)
    params, x = params.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
    batch, height, width, _ = params.shape
    logits = params[..., :mix]
    other = params[..., mix:].reshape(batch, height, width, 3, 3 * mix)
    means, log_scales = other[..., :mix], other[..., mix:2 * mix].clamp(min=-7.0)
    coeffs = torch.tanh(other[..., 2 * mix:])
    x = x.unsqueeze(-1) + torch.zeros_like(means)
    means = torch.stack([
        means[:, :, :, 0],
        means[:, :, :, 1] + coeffs[:, :, :, 0] * x[:, :, :, 0],
        means[:, :, :, 2] + coeffs[:, :, :, 1] * x[:, :, :, 0] + coeffs[:, :, :, 2] * x[:, :, :, 1],
    ], 3)
    centred = x - means
    inv_std = torch.exp(-log_scales)
    plus_in, min_in, mid_in = inv_std * (centred + binsize), inv_std * (centred - binsize), inv_std * centred
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    tiny_bin = log_pdf_mid - math.log(0.5 / binsize)
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), tiny_bin)
    inner = torch.where(x > 0.999, -F.softplus(min_in), inner)
    log_probs = torch.where(x < -0.999, plus_in - F.softplus(plus_in), inner)
    log_probs = log_probs.sum(3) + torch.log_softmax(logits, -1)
    return torch.logsumexp(log_probs, -1).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Loading


def test_the_written_checkpoint_needs_the_lightning_reference_stubbed(tmp_path):
    path = write(release_checkpoint(CNN), tmp_path / "release.ckpt")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert "pytorch_lightning.trainer.trainer.Trainer" in unsafe
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(path, weights_only=True)  # a plain safe load stops at the function reference


def test_neg_elbo_with_fixed_noise_equals_the_release_equations(tmp_path, monkeypatch):
    checkpoint = release_checkpoint(CNN)
    model = load_release_checkpoint(write(checkpoint, tmp_path / "release.ckpt"))
    assert not model.training
    images = torch.randint(0, 256, (3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    # one posterior draw per layer, top layer first (layers 2 and 1 at 8x8, layer 0 at 16x16)
    generator = torch.Generator().manual_seed(2)
    sizes = (IMAGE_SIZE // 4, IMAGE_SIZE // 4, IMAGE_SIZE // 2)
    noise = [torch.randn(3, CNN["z_size"], s, s, generator=generator) for s in sizes]
    queue = list(noise)

    def fixed_noise(like, **kwargs):
        eps = queue.pop(0)
        assert eps.shape == like.shape
        return eps.clone()

    monkeypatch.setattr(torch, "randn_like", fixed_noise)
    with torch.no_grad():
        ours = -model(model.obs.preprocess(images))["elbo"]
        expected = release_neg_elbo(checkpoint["state_dict"], CNN, images, noise)
    assert not queue
    assert torch.isfinite(expected).all() and expected.abs().min() > 10
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("old_names", [True, False], ids=["pre_cnn-names", "project_in_stage-names"])
def test_both_generations_of_sdn_names_map_every_tensor(tmp_path, old_names):
    checkpoint = release_checkpoint(SDN, old_names=old_names)
    state = checkpoint["state_dict"]
    weights = read_release_checkpoint(write(checkpoint, tmp_path / "release.ckpt"))
    ema_slots = [value for key, value in state.items() if key.startswith("ema.shadow_params.")]
    raw_tensors = [value for key, value in state.items() if not key.startswith("ema.")]
    # every tensor lands somewhere, once: the tensors are all distinct, so compare their sums
    assert sorted(float(t.sum()) for t in raw_tensors) == sorted(float(t.sum()) for t in weights.raw.values())
    assert sorted(float(t.sum()) for t in ema_slots) == \
        sorted(float(t.sum()) for name, t in weights.ema.items() if not name.endswith(".mask"))
    model = load_release_checkpoint(tmp_path / "release.ckpt")
    correction = "sdn_update_network" if old_names else "sdn_correction_stage"
    gru = state[f"ema.shadow_params.ladder_layers^1^down_b^sdn^{correction}^1^cell^gru^weight_hh"]
    assert torch.equal(model.ladder[1].down_b.sdn.corrections[1].cell.weight_hh, gru)
    assert torch.equal(model.top, state["ema.shadow_params.h"])  # EMA, not the raw `h`
    assert model.obs.log_scale.shape == ()
    assert model.obs.log_scale == state["ema.shadow_params.obs_model^logscale"]
    # a transposed conv's weight is normalised per output channel (dim 1), as the release's WN does
    g = state["ema.shadow_params.ladder_layers^1^down_b^cnn^weight_g"]
    v = state["ema.shadow_params.ladder_layers^1^down_b^cnn^weight_v"]
    expected = g * v / v.pow(2).sum((0, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(model.ladder[1].down_b.conv.weight, expected)


def test_both_generations_give_the_same_model(tmp_path):
    old = load_release_checkpoint(write(release_checkpoint(SDN, old_names=True), tmp_path / "old.ckpt"))
    new = load_release_checkpoint(write(release_checkpoint(SDN, old_names=False), tmp_path / "new.ckpt"))
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("form", ["attribute-dict", "dotted-global"])
def test_other_forms_lightning_wrote_load(tmp_path, form):
    checkpoint = release_checkpoint(CNN, attribute_dict=form == "attribute-dict",
                                    dotted=form == "dotted-global")
    weights = read_release_checkpoint(write(checkpoint, tmp_path / "release.ckpt"))
    assert type(weights.hyper_parameters) is dict and weights.hyper_parameters["z_size"] == CNN["z_size"]
    assert "Lightning 0.9" in repr(weights.hyper_parameters["tpu_cores"])
    assert weights.info == {"epoch": 42, "global_step": 1234, "pytorch-lightning_version": "0.9.0"}


def test_zero_ema_coef_means_the_raw_weights(tmp_path):
    checkpoint = release_checkpoint(CNN)
    checkpoint["hyper_parameters"]["ema_coef"] = 0  # the release's EMA.assign then does nothing
    model = load_release_checkpoint(write(checkpoint, tmp_path / "release.ckpt"))
    assert torch.equal(model.top, checkpoint["state_dict"]["h"])


# ---------------------------------------------------------------------------------------------
# Refusals, each naming what is wrong


def renamed(state, old, new):
    return OrderedDict((new if key == old else key, value) for key, value in state.items())


def dropped(state, key):
    return OrderedDict((k, v) for k, v in state.items() if k != key)


def reshaped(state, key):
    state = OrderedDict(state)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    return state


def unmasked(state, key):
    state = OrderedDict(state)
    state[key] = torch.ones_like(state[key])
    return state


MUTATIONS = {
    "renamed": (lambda s: renamed(s, "ladder_layers.1.up_b.weight_g", "ladder_layers.1.up_b.weight_gain"),
                ["'ladder_layers.1.up_b.weight_gain'", "'ladder_layers.1.up_b.weight_g'"]),
    "missing-raw": (lambda s: dropped(s, "first_layer.0.bias"), ["missing", "'first_layer.0.bias'"]),
    "missing-ema": (lambda s: dropped(s, "ema.shadow_params.last_layer^2^weight_v"),
                    ["missing", "'ema.shadow_params.last_layer^2^weight_v'"]),
    "extra": (lambda s: OrderedDict(s, **{"ladder_layers.3.up_a.bias": torch.zeros(1)}),
              ["unexpected", "'ladder_layers.3.up_a.bias'"]),
    "mis-shaped": (lambda s: reshaped(s, "ladder_layers.0.down_a.bias"),
                   ["'ladder_layers.0.down_a.bias'", "shape"]),
    "mis-shaped-ema": (lambda s: reshaped(s, "ema.shadow_params.ladder_layers^2^down_b^weight_v"),
                       ["'ema.shadow_params.ladder_layers^2^down_b^weight_v'", "shape"]),
    "wrong-mask": (lambda s: unmasked(s, "ladder_layers.2.post_model.arnn.conv_a.mask"),
                   ["'ladder_layers.2.post_model.arnn.conv_a.mask'", "mask"]),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_state_dict_that_does_not_match_is_refused_by_name(tmp_path, mutation):
    mutate, fragments = MUTATIONS[mutation]
    path = write(release_checkpoint(CNN, state=mutate(release_state(CNN))), tmp_path / "release.ckpt")
    with pytest.raises(ReleaseCheckpointError) as info:
        load_release_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("post_model", "Flow", "hyper_parameters.post_model"),
    ("obs_model", "Bernoulli", "hyper_parameters.obs_model"),
    ("dataset", "3DShapes", "hyper_parameters.dataset"),
    ("ds_list", None, "hyper_parameters.ds_list"),
    ("task", "disentanglement", "hyper_parameters.task"),
])
def test_unsupported_hyper_parameters_are_refused_by_name(tmp_path, key, value, fragment):
    checkpoint = release_checkpoint(CNN)
    checkpoint["hyper_parameters"][key] = value
    with pytest.raises(ReleaseCheckpointError, match=fragment):
        load_release_checkpoint(write(checkpoint, tmp_path / "release.ckpt"))


class RunsCode:
    """Unpickling this calls `call(*args)`."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("attack", ["os.system", "eval", "getattr"])
def test_a_pickle_that_would_run_code_does_not_run(tmp_path, attack):
    marker = tmp_path / "marker"
    checkpoint = release_checkpoint(CNN)
    if attack == "os.system":
        payload, named = RunsCode(os.system, f"touch {marker}"), "posix.system"
    elif attack == "eval":
        payload, named = RunsCode(eval, f"open({str(marker)!r}, 'w').close()"), "eval"
    else:  # the admitted getattr stand-in, asked for anything but Trainer._gpus_arg_default
        payload, named = FunctionReference(attribute="__init__"), "'__init__'"
    path = write({"callbacks": payload, **checkpoint}, tmp_path / "evil.ckpt")
    if attack != "getattr":
        # The file is live: an ordinary unpickling runs it (and then fails, as the spec says, at
        # the function reference that today's Lightning no longer has).
        with pytest.raises(AttributeError, match="_gpus_arg_default"):
            torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ReleaseCheckpointError) as info:
        load_release_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert "refused" in message and named in message and "\n" not in message, message


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    page = tmp_path / "CelebAHQ256.ckpt"
    page.write_text("<!DOCTYPE html><html>Google Drive - Virus scan warning</html>")
    with pytest.raises(ReleaseCheckpointError, match="not a PyTorch checkpoint.*not a web page"):
        load_release_checkpoint(page)


# ---------------------------------------------------------------------------------------------
# The pipeline: the release stage and what evaluate/sample load


def tiny_params(sha256: str | None, **model) -> dict:
    return {
        "datasets": {"tiny": {"image_size": IMAGE_SIZE, "channels": 3}},  # as the release's CIFAR10
        "bases": {"tiny": {"dataset": "tiny", "seed": 3, "model": {"kind": "density", **CNN, **model},
                           "train": {}, "evaluate": {}, "sample": {}}},
        "experiments": {"tiny-release": {
            "extends": "tiny",
            "release": {"url": "https://example.org/tiny.ckpt", "sha256": sha256, "file": "Tiny.ckpt"},
        }},
    }


def test_import_pins_verifies_and_writes_what_evaluate_loads(tmp_path):
    raw_root, ckpt_dir = tmp_path / "raw", tmp_path / "checkpoints" / "tiny-release"
    (raw_root / "tiny-release").mkdir(parents=True)
    source = write(release_checkpoint(CNN), raw_root / "tiny-release" / "Tiny.ckpt")
    cfg = experiment_config(tiny_params(None), "tiny-release")
    with pytest.raises(ChecksumError) as info:  # not pinned yet: the digest is printed to pin
        import_release(cfg, raw_root, ckpt_dir)
    digest = info.value.args[0].split("Its sha256 is ")[1].split(".")[0]
    assert "experiments.tiny-release.release" in str(info.value) and len(digest) == 64
    assert not ckpt_dir.exists()

    cfg = experiment_config(tiny_params(digest), "tiny-release")
    path = import_release(cfg, raw_root, ckpt_dir)
    assert path == ckpt_dir / LAST_CHECKPOINT
    assert torch.load(path, weights_only=True)["sdn_release"]["sha256"] == digest  # plain weights only
    evaluated = load_ema_model(cfg, path)
    released = load_release_checkpoint(source)
    for (name, a), (_, b) in zip(evaluated.state_dict().items(), released.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert import_release(cfg, raw_root, ckpt_dir) == path  # idempotent


def test_import_refuses_a_checkpoint_of_another_model(tmp_path):
    raw_root = tmp_path / "raw"
    (raw_root / "tiny-release").mkdir(parents=True)
    source = write(release_checkpoint(CNN), raw_root / "tiny-release" / "Tiny.ckpt")
    from sdn.data.download import file_digest

    cfg = experiment_config(tiny_params(file_digest(source, "sha256"), h_size=8), "tiny-release")
    with pytest.raises(ConfigError, match=r"model\.h_size: 6 \(params\.yaml has 8\)"):
        import_release(cfg, raw_root, tmp_path / "checkpoints")


def test_a_wrong_checksum_is_refused(tmp_path):
    raw_root = tmp_path / "raw"
    (raw_root / "tiny-release").mkdir(parents=True)
    write(release_checkpoint(CNN), raw_root / "tiny-release" / "Tiny.ckpt")
    cfg = experiment_config(tiny_params("0" * 64), "tiny-release")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        import_release(cfg, raw_root, tmp_path / "checkpoints")


@pytest.mark.parametrize(("release", "fragment"), [
    ({"url": "https://example.org/x", "file": "x.ckpt"}, "release.sha256: missing"),
    ({"url": "https://example.org/x", "sha256": "abc", "file": "x.ckpt"}, "64 hex digits"),
    ({"url": "https://example.org/x", "sha256": None, "file": "../x.ckpt"}, "bare file name"),
    ({"url": "https://example.org/x", "sha256": None, "file": "x.ckpt", "md5": None},
     "release.md5: unknown key"),
])
def test_release_section_is_validated(release, fragment):
    params = tiny_params(None)
    params["experiments"]["tiny-release"]["release"] = release
    with pytest.raises(ConfigError, match=fragment):
        experiment_config(params, "tiny-release")


def test_stage_without_the_file_ends_with_one_error_line_naming_path_and_link(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    (project / "params.yaml").write_text(yaml.safe_dump(params))  # the paper's runs too, in one file
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "release.py"), "celebahq256-release"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    url = params["experiments"]["celebahq256-release"]["release"]["url"]
    assert "data/raw/celebahq256-release/CelebAHQ256.ckpt" in lines[0] and url in lines[0]
    assert not (project / "data").exists()


def test_make_target_imports_then_evaluates_and_samples():
    result = subprocess.run([*MAKE, "-n", "celebahq256-release"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    commands = [line for line in result.stdout.splitlines() if "release.py" in line or "dvc repro" in line]
    assert "stages/release.py celebahq256-release" in commands[0], result.stdout
    assert "evaluate@celebahq256-release" in commands[1] and "sample@celebahq256-release" in commands[1]
    help_text = subprocess.run([*MAKE, "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "celebahq256-release" in help_text
