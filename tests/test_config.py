"""params.yaml validation: every bad key, type or value stops with a `ConfigError` that names the
dotted key and what was expected; the committed params.yaml passes and its default runs build."""

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass

import pytest
import torch
import yaml

from sdn.__main__ import describe
from sdn.config import (
    OVERRIDDEN,
    ExperimentConfig,
    experiment_config,
    validate_params,
)
from sdn.data.sources import SOURCES, validate_datasets
from sdn.errors import ConfigError
from sdn.hyperparameters import DensityConfig, DisentanglementConfig
from sdn.models import build_model
from sdn.params import dataset_config, load_params
from sdn.schema import Range, build_section, has_range, mentions_number, ranged
from sdn.training.checkpoints import config_fingerprint
from sdn.training.module import VAEModule
from tests.params_tools import BASE_ONLY

PARAMS = load_params()
DENSITY = "photos32-sdn"
BETA_VAE = "sprites-sdn"
DEFAULT_EXPERIMENTS = ("photos32-sdn", "photos32-cnn", "sprites-sdn", "sprites-cnn")
DELETE = object()


def edited(path: tuple, value) -> dict:
    """A deep copy of the committed params with the value at `path` replaced (or deleted)."""
    params = copy.deepcopy(PARAMS)
    section = params
    for key in path[:-1]:
        section = section.setdefault(key, {})
    if value is DELETE:
        del section[path[-1]]
    else:
        section[path[-1]] = value
    return params


def experiment_path(name: str, *keys: str) -> tuple:
    """Where `keys` of experiment `name` are set: its base for what only a base holds (dataset,
    seed, evaluate, sample) and for the model and training keys it takes from the base unchanged;
    the experiment itself otherwise."""
    experiment = PARAMS["experiments"][name]
    base = PARAMS["bases"][experiment["extends"]]
    if keys and (keys[0] in BASE_ONLY or (
        len(keys) > 1 and keys[0] in OVERRIDDEN and keys[1] in base[keys[0]]
        and keys[1] not in experiment.get(keys[0], {})
    )):
        return ("bases", experiment["extends"], *keys)
    return ("experiments", name, *keys)


def dotted(name: str, *keys: str) -> str:
    return ".".join(experiment_path(name, *keys))


def config_error(params: dict, name: str) -> str:
    with pytest.raises(ConfigError) as info:
        experiment_config(params, name)
    return str(info.value)


def assert_names(message: str, key: str, *expected: str) -> None:
    assert message.startswith(f"{key}:"), message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# The committed params.yaml


def test_committed_params_validate():
    configs = validate_params(load_params())
    assert [cfg.name for cfg in configs] == list(PARAMS["experiments"])
    for cfg in configs:
        expected_kind = DensityConfig if cfg.kind == "density" else DisentanglementConfig
        assert isinstance(cfg.model, expected_kind)
        dataset = PARAMS["datasets"][cfg.dataset]
        assert (cfg.model.image_size, cfg.model.channels) == (dataset["image_size"], dataset["channels"])


def test_experiment_trainer_overrides_single_keys():
    cfg = experiment_config(PARAMS, "cifar10-sdn")
    assert cfg.trainer.precision == "16-mixed"  # from the experiment
    assert cfg.trainer.log_every_n_steps == PARAMS["trainer"]["log_every_n_steps"]  # from the defaults


def test_int_given_for_float_is_converted():
    # `lr: 1` and `lr: 1.0` are one configuration: the same checkpoint fingerprint, a float optimiser rate
    as_int = experiment_config(edited(experiment_path(DENSITY, "train", "lr"), 1), DENSITY)
    as_float = experiment_config(edited(experiment_path(DENSITY, "train", "lr"), 1.0), DENSITY)
    assert config_fingerprint(as_int) == config_fingerprint(as_float)
    assert config_fingerprint(as_int) != config_fingerprint(experiment_config(PARAMS, DENSITY))
    assert isinstance(as_int.train.lr, float)


@pytest.mark.parametrize("name", DEFAULT_EXPERIMENTS)
def test_default_experiments_build_and_run(name):
    cfg = experiment_config(PARAMS, name)
    model = build_model(cfg)
    size, channels = cfg.model.image_size, cfg.model.channels
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(model.obs.preprocess(images))
    assert out["elbo"].shape == (2,)
    assert torch.isfinite(out["elbo"]).all()


@pytest.mark.parametrize("pair", [("photos32-sdn", "photos32-cnn"), ("sprites-sdn", "sprites-cnn")])
def test_default_pairs_have_comparable_parameter_counts(pair):
    sdn, cnn = (sum(p.numel() for p in build_model(experiment_config(PARAMS, n)).parameters()) for n in pair)
    assert 0.75 < sdn / cnn < 1.33, (sdn, cnn)


def fields_of(section, **expected) -> dict:
    return {key: getattr(section, key) for key in expected}


PAPER_MODELS = {
    "cifar10-sdn": dict(depth=15, ds_list=[5, 10], h_size=200, z_size=4, sdn_nfeat_0=360, sdn_nfeat_diff=128,
                        sdn_num_dirs=2, sdn_max_scale=32, mix_components=5, post_model="IAF", obs_model="DML",
                        free_bits=0.01),
    "imagenet32-sdn": dict(depth=16, ds_list=[3, 7, 11], h_size=200, z_size=4, sdn_nfeat_0=424,
                           sdn_nfeat_diff=0, sdn_num_dirs=3, sdn_max_scale=32, mix_components=10),
    "celebahq256-sdn": dict(depth=17, ds_list=[4, 7, 9, 11, 13, 15], h_size=200, z_size=8, sdn_nfeat_0=400,
                            sdn_nfeat_diff=80, sdn_num_dirs=2, sdn_max_scale=64, mix_components=30, nbits=5),
    "3dshapes-sdn": dict(z_size=10, sdn_nfeat_0=200, sdn_num_dirs=1, sdn_max_scale=32, sdn_min_scale=32,
                         obs_model="DL"),
}
# The release's final train_*.sh (docs/maths.md#paper-runs); the β-VAE ignores the script's
# --lrate_decay and --amp, and has no EMA and no weight norm (docs/maths.md#beta-vae-regime).
PAPER_TRAINING = {
    "cifar10-sdn": (1234, dict(batch_size=32, lr=0.002, lrate_decay=0.999, ema_coef=0.999, weight_norm=True)),
    "imagenet32-sdn": (13, dict(batch_size=32, lr=0.002, lrate_decay=1.0, ema_coef=0.9995, weight_norm=True)),
    "celebahq256-sdn": (
        1234, dict(batch_size=4, lr=0.001, lrate_decay=0.999, ema_coef=0.999, weight_norm=True),
    ),
    "3dshapes-sdn": (1234, dict(batch_size=128, lr=0.001, lrate_decay=1.0, ema_coef=None, weight_norm=False)),
}
PAPER_TRAINERS = {  # (devices, strategy, precision of the SDN run, of the CNN baseline)
    "cifar10": (8, "ddp", "16-mixed", "32-true"),
    "imagenet32": (8, "ddp", "16-mixed", "16-mixed"),
    "celebahq256": (8, "ddp", "16-mixed", "16-mixed"),
    "3dshapes": (1, "auto", "32-true", "32-true"),
}


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_runs_use_the_spec_values(name):
    cfg = experiment_config(PARAMS, name)
    assert fields_of(cfg.model, **PAPER_MODELS[name]) == PAPER_MODELS[name]
    seed, train = PAPER_TRAINING[name]
    assert cfg.seed == seed
    assert fields_of(cfg.train, **train) == train


@pytest.mark.parametrize("run", PAPER_TRAINERS)
def test_paper_runs_use_the_scripts_devices_and_precision(run):
    devices, strategy, sdn_precision, cnn_precision = PAPER_TRAINERS[run]
    for kind, precision in (("sdn", sdn_precision), ("cnn", cnn_precision)):
        trainer = experiment_config(PARAMS, f"{run}-{kind}").trainer
        assert (trainer.devices, trainer.strategy, str(trainer.precision)) == (devices, strategy, precision)


def test_training_flips_as_released():
    flips = {name: dataset_config(PARAMS, name)["flip"] for name in ("cifar10", "imagenet32", "celebahq256",
                                                                     "3dshapes")}
    assert flips == {"cifar10": True, "imagenet32": False, "celebahq256": True, "3dshapes": False}


def test_ema_coef_null_means_no_ema():
    cfg = experiment_config(edited(experiment_path(DENSITY, "train", "ema_coef"), None), DENSITY)
    module = VAEModule(cfg)
    assert module.ema is None and module.eval_model is module.model  # evaluation uses the raw weights
    assert VAEModule(experiment_config(PARAMS, DENSITY)).ema is not None


@pytest.mark.parametrize("name", [name.removesuffix("-sdn") for name in PAPER_MODELS])
def test_paper_baselines_differ_only_in_sdn_knobs(name):
    paper, baseline = (experiment_config(PARAMS, f"{name}-{kind}") for kind in ("sdn", "cnn"))
    assert paper.baseline == f"{name}-cnn"
    assert baseline.model.sdn_max_scale == 0
    differs = {
        f.name for f in dataclasses.fields(paper.model)
        if getattr(paper.model, f.name) != getattr(baseline.model, f.name)
    }
    assert differs and all(key.startswith("sdn_") for key in differs), differs
    assert paper.train == baseline.train


# ---------------------------------------------------------------------------------------------
# Unknown and misspelt keys


def test_unknown_top_level_section():
    params = copy.deepcopy(PARAMS)
    params["trainr"] = {}
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    assert_names(str(info.value), "trainr", "unknown", "Did you mean 'trainer'?")


def test_unknown_key_in_global_trainer():
    params = edited(("trainer", "devcies"), 2)
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    assert_names(str(info.value), "trainer.devcies", "unknown key", "Did you mean 'devices'?")


@pytest.mark.parametrize(
    ("name", "keys", "suggestion"),
    [
        (DENSITY, ("trian",), "train"),
        (DENSITY, ("model", "z_sise"), "z_size"),
        (DENSITY, ("model", "sdn_nfeat0"), "sdn_nfeat_0"),
        (BETA_VAE, ("model", "beta_finale"), "beta_final"),
        (DENSITY, ("train", "ema_coeff"), "ema_coef"),
        (DENSITY, ("evaluate", "iw_sample"), "iw_samples"),
        (DENSITY, ("sample", "temperature"), "temperatures"),
        (DENSITY, ("trainer", "precison"), "precision"),
    ],
)
def test_misspelt_key_names_the_key_and_suggests(name, keys, suggestion):
    message = config_error(edited(experiment_path(name, *keys), 1), name)
    assert_names(message, dotted(name, *keys), "unknown key", f"Did you mean '{suggestion}'?")


def test_unknown_key_without_close_match_lists_the_known_keys():
    message = config_error(edited(experiment_path(DENSITY, "train", "zzz"), 1), DENSITY)
    assert_names(message, dotted(DENSITY, "train", "zzz"), "unknown key", "Known keys:", "batch_size")


# ---------------------------------------------------------------------------------------------
# Wrong types


@pytest.mark.parametrize(
    ("name", "keys", "value", "expected"),
    [
        (DENSITY, ("model", "depth"), "4", "expected int, got str '4'"),
        (DENSITY, ("model", "h_size"), True, "expected int, got bool True"),
        (DENSITY, ("model", "z_size"), 4.0, "expected int, got float"),
        (DENSITY, ("model", "ds_list"), [1, "2"], "expected list[int]"),
        (DENSITY, ("model", "ds_list"), 1, "expected list[int], got int"),
        (DENSITY, ("model", "downsample_first"), "no", "expected bool"),
        (DENSITY, ("model", "free_bits"), "0.01", "expected float"),
        (DENSITY, ("train", "lr"), True, "expected float, got bool"),
        (DENSITY, ("train", "weight_norm"), 1, "expected bool"),
        (DENSITY, ("train", "gradient_clip_val"), "1", "expected float or null"),
        (DENSITY, ("train", "val_batches"), 2.5, "expected int or null"),
        (DENSITY, ("sample", "temperatures"), ["hot"], "expected list[float]"),
        (DENSITY, ("sample", "temperatures"), 1.0, "expected list[float]"),
        (DENSITY, ("evaluate", "iw_samples"), False, "expected int, got bool"),
        (DENSITY, ("trainer", "devices"), True, "expected int or str"),
        (DENSITY, ("trainer", "deterministic"), "yes", "expected bool"),
        (BETA_VAE, ("model", "beta_final"), "4", "expected float"),
        (BETA_VAE, ("model", "z_size"), [6], "expected int"),
    ],
)
def test_wrong_type(name, keys, value, expected):
    message = config_error(edited(experiment_path(name, *keys), value), name)
    assert_names(message, dotted(name, *keys), expected)


@pytest.mark.parametrize("section", ["train", "evaluate", "sample", "trainer"])
def test_section_must_be_a_mapping(section):
    message = config_error(edited(experiment_path(DENSITY, section), [1, 2]), DENSITY)
    assert_names(message, dotted(DENSITY, section), "expected a mapping")


@pytest.mark.parametrize("value", ["density", 5, [1]])
def test_model_must_be_a_mapping(value):
    message = config_error(edited(experiment_path(DENSITY, "model"), value), DENSITY)
    assert_names(message, f"experiments.{DENSITY}.model", "mapping")


def test_experiment_must_be_a_mapping():
    message = config_error(edited(experiment_path(DENSITY), 5), DENSITY)
    assert_names(message, f"experiments.{DENSITY}", "expected a mapping")


@pytest.mark.parametrize(("key", "value", "expected"), [("seed", "17", "integer"), ("seed", True, "integer"),
                                                        ("dataset", 5, "dataset name")])
def test_wrong_type_of_experiment_field(key, value, expected):
    message = config_error(edited(experiment_path(DENSITY, key), value), DENSITY)
    assert_names(message, dotted(DENSITY, key), expected)


# ---------------------------------------------------------------------------------------------
# Impossible values

IMPOSSIBLE = [
    # density model
    (DENSITY, ("model", "ds_list"), [1, 4], "ds_list", "outside 0..depth-1"),
    (DENSITY, ("model", "ds_list"), [-1], "ds_list", "every value must be non-negative"),
    (DENSITY, ("model", "ds_list"), [1, 1], "ds_list", "repeated"),
    (DENSITY, ("model", "nbits"), 0, "nbits", "between 1 and 8"),
    (DENSITY, ("model", "nbits"), 9, "nbits", "between 1 and 8"),
    (DENSITY, ("model", "sdn_num_dirs"), 5, "sdn_num_dirs", "between 0 and 4"),
    (DENSITY, ("model", "sdn_num_dirs"), -1, "sdn_num_dirs", "between 0 and 4"),
    (DENSITY, ("model", "sdn_num_dirs"), 0, "sdn_num_dirs", "at least 1 direction"),
    (DENSITY, ("model", "sdn_nfeat_0"), 0, "sdn_nfeat_0", "at least 1 feature"),
    (DENSITY, ("model", "kind"), "gan", "kind", "density, disentanglement"),
    (DENSITY, ("model", "kind"), DELETE, "kind", "density, disentanglement"),
    (DENSITY, ("model", "post_model"), "Flow", "post_model", "IAF, IsoGaussian"),
    (DENSITY, ("model", "prior_model"), "Laplace", "prior_model", "IsoGaussian"),
    (DENSITY, ("model", "obs_model"), "Gaussian", "obs_model", "DML, DL, Bernoulli"),
    (DENSITY, ("model", "z_size"), 0, "z_size", "at least 1"),
    (DENSITY, ("model", "h_size"), 0, "h_size", "at least 1"),
    (DENSITY, ("model", "depth"), 0, "depth", "at least 1"),
    (DENSITY, ("model", "mix_components"), 0, "mix_components", "at least 1"),
    (DENSITY, ("model", "free_bits"), -0.1, "free_bits", "non-negative"),
    (DENSITY, ("model", "sdn_max_scale"), -1, "sdn_max_scale", "non-negative"),
    (DENSITY, ("model", "sdn_nfeat_diff"), -8, "sdn_nfeat_diff", "non-negative"),
    # disentanglement model
    (BETA_VAE, ("model", "kind"), "vae", "kind", "density, disentanglement"),
    (BETA_VAE, ("model", "obs_model"), "Gaussian", "obs_model", "DML, DL, Bernoulli"),
    (BETA_VAE, ("model", "nbits"), 9, "nbits", "between 1 and 8"),
    (BETA_VAE, ("model", "sdn_num_dirs"), 5, "sdn_num_dirs", "between 0 and 4"),
    (BETA_VAE, ("model", "sdn_num_dirs"), 0, "sdn_num_dirs", "at least 1 direction"),
    (BETA_VAE, ("model", "sdn_nfeat_0"), 0, "sdn_nfeat_0", "at least 1 feature"),
    (BETA_VAE, ("model", "z_size"), 0, "z_size", "at least 1"),
    (BETA_VAE, ("model", "beta_rate"), 0.0, "beta_rate", "(0, 1]"),
    (BETA_VAE, ("model", "beta_rate"), 1.5, "beta_rate", "(0, 1]"),
    (BETA_VAE, ("model", "beta_final"), -1.0, "beta_final", "non-negative"),
    # training, evaluation, sampling, trainer
    (DENSITY, ("train", "lrate_decay"), 0.0, "lrate_decay", "(0, 1]"),
    (DENSITY, ("train", "lrate_decay"), 1.5, "lrate_decay", "(0, 1]"),
    (DENSITY, ("train", "ema_coef"), 1.0, "ema_coef", "[0, 1)"),
    (DENSITY, ("train", "ema_coef"), -0.5, "ema_coef", "[0, 1)"),
    (DENSITY, ("train", "lr"), 0.0, "lr", "positive"),
    (DENSITY, ("train", "batch_size"), 0, "batch_size", "at least 1"),
    (DENSITY, ("train", "max_steps"), 0, "max_steps", "at least 1"),
    (DENSITY, ("train", "accumulate_grad_batches"), 0, "accumulate_grad_batches", "at least 1"),
    (DENSITY, ("train", "init"), "xavier", "init", "orthogonal, default"),
    (DENSITY, ("evaluate", "iw_samples"), 0, "iw_samples", "at least 1"),
    (DENSITY, ("evaluate", "chunk_size"), 0, "chunk_size", "at least 1"),
    (DENSITY, ("sample", "temperatures"), [1.0, -0.5], "temperatures", "non-negative"),
    (DENSITY, ("trainer", "precision"), "16", "precision", "16-mixed"),
]


@pytest.mark.parametrize(("name", "keys", "value", "key", "expected"), IMPOSSIBLE)
def test_impossible_value(name, keys, value, key, expected):
    message = config_error(edited(experiment_path(name, *keys), value), name)
    assert_names(message, dotted(name, *keys[:-1], key), expected)


def test_downsampling_an_odd_map():
    params = edited(("datasets", "photos32", "image_size"), 12)
    params["experiments"][DENSITY]["model"]["downsample_first"] = False
    params["experiments"][DENSITY]["model"]["ds_list"] = [1, 2, 3]  # 12 -> 6 -> 3 -> odd
    message = config_error(params, DENSITY)
    assert_names(message, f"experiments.{DENSITY}.model.ds_list", "layer 3", "odd 3x3 map")


def test_downsample_first_needs_an_even_image():
    params = edited(("datasets", "photos32", "image_size"), 9)
    params["experiments"][DENSITY]["model"]["downsample_first"] = True
    message = config_error(params, DENSITY)
    assert_names(message, f"experiments.{DENSITY}.model.downsample_first", "even image size")


def test_28x28_images_are_padded_before_downsampling():
    # 28 + 2*2 = 32 -> 16 -> 8 -> 4: never odd (28 -> 14 -> 7 would be), so the config is accepted
    params = edited(("datasets", "photos32", "image_size"), 28)
    params["experiments"][DENSITY]["model"]["downsample_first"] = False
    params["experiments"][DENSITY]["model"]["ds_list"] = [0, 1, 2]
    model = build_model(experiment_config(params, DENSITY))
    assert [layer["scale"] for layer in describe(model)["ladder"]] == [32, 16, 8, 4]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.isfinite(model(model.obs.preprocess(images))["elbo"]).all()


def test_beta_vae_needs_64x64_images():
    message = config_error(edited(("datasets", "sprites", "image_size"), 32), BETA_VAE)
    assert_names(message, f"experiments.{BETA_VAE}.model.image_size", "64x64")


@pytest.mark.parametrize("name", ["photos32-cnn", "sprites-cnn"])
def test_cnn_baseline_needs_no_sdn_features(name):
    # sdn_nfeat_0 0 and sdn_num_dirs 0 are refused for an SDN run, accepted when no scale uses SDN
    described = describe(build_model(experiment_config(PARAMS, name)))
    layers = described.get("ladder", []) + [described.get("last_layer", {"sdn": False})]
    layers += described.get("decoder_stages", [])
    assert layers and not any(layer["sdn"] for layer in layers)
    sdn_run = edited(experiment_path(name, "model", "sdn_max_scale"), 64)
    assert_names(config_error(sdn_run, name), f"experiments.{name}.model.sdn_nfeat_0", "at least 1 feature")


def test_unknown_baseline():
    message = config_error(edited(experiment_path(DENSITY, "baseline"), "photos32-rnn"), DENSITY)
    assert_names(message, f"experiments.{DENSITY}.baseline", "no experiment named 'photos32-rnn'")


def test_reported_must_be_a_mapping():
    message = config_error(edited(experiment_path("cifar10-sdn", "reported"), [2.87]), "cifar10-sdn")
    assert_names(message, "experiments.cifar10-sdn.reported", "mapping")


# ---------------------------------------------------------------------------------------------
# Missing keys, unknown names


@pytest.mark.parametrize("key", ["dataset", "seed", "model", "train", "evaluate", "sample"])
def test_missing_required_key_of_a_base(key):
    message = config_error(edited(("bases", "photos32", key), DELETE), DENSITY)
    assert_names(message, f"bases.photos32.{key}", "missing", "required")


def test_experiment_needs_a_base():
    message = config_error(edited(("experiments", DENSITY, "extends"), DELETE), DENSITY)
    assert_names(message, f"experiments.{DENSITY}.extends", "missing", "bases")
    message = config_error(edited(("experiments", DENSITY, "extends"), "photos64"), DENSITY)
    assert_names(message, "bases.photos64", "no such base", "Did you mean 'photos32'?")


@pytest.mark.parametrize("key", ["evaluate", "sample", "dataset", "seed"])
def test_what_a_base_shares_is_set_on_the_base(key):
    message = config_error(edited(("experiments", DENSITY, key), {}), DENSITY)
    assert_names(message, f"experiments.{DENSITY}.{key}", f"bases.<base>.{key}", "every run extending it")


def test_a_name_defined_in_both_files_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"experiments": {"x": {"extends": "a"}}}))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"experiments": {"x": {"extends": "b"}}}))
    with pytest.raises(ConfigError, match=r"^experiments\.x: defined in both params.yaml and paper.yaml"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"trainer": {"devices": 2}}))
    with pytest.raises(ConfigError, match=r"^paper.yaml.trainer: unknown section"):
        load_params(tmp_path / "params.yaml")


def test_a_base_no_experiment_extends_is_refused():
    params = edited(("bases", "unused"), copy.deepcopy(PARAMS["bases"]["photos32"]))
    with pytest.raises(ConfigError, match=r"^bases\.unused: no experiment extends it"):
        validate_params(params)


def test_missing_required_field_of_a_section():
    @dataclass
    class Section:
        size: int
        name: str = "x"

    with pytest.raises(ConfigError) as info:
        build_section(Section, {"name": "y"}, "demo")
    assert_names(str(info.value), "demo.size", "missing", "required", "int")
    assert build_section(Section, {"size": 3}, "demo") == {"size": 3}


def test_a_field_range_in_its_metadata_is_enforced_naming_the_key():
    @dataclass
    class Section:
        size: int = ranged(4, Range(1, 8))
        scales: list[float] = ranged(allowed=Range(0), factory=lambda: [1.0])

    assert build_section(Section, {"size": 8, "scales": [0, 2.5]}, "demo") == {"size": 8, "scales": [0, 2.5]}
    with pytest.raises(ConfigError, match=r"^demo\.size: must be between 1 and 8, got 9\.$"):
        build_section(Section, {"size": 9}, "demo")
    with pytest.raises(ConfigError, match=r"^demo\.scales: every value must be non-negative"):
        build_section(Section, {"scales": [1.0, -1.0]}, "demo")


@pytest.mark.parametrize(
    ("name", "expected"), [("photos32-sdm", "Did you mean 'photos32-sdn'?"), ("nothing-like-it", "Known:")]
)
def test_unknown_experiment(name, expected):
    message = config_error(PARAMS, name)
    assert_names(message, f"experiments.{name}", "no such experiment", expected)


def test_unknown_dataset():
    message = config_error(edited(experiment_path(DENSITY, "dataset"), "mnist"), DENSITY)
    assert_names(message, "datasets.mnist", "no such dataset", "photos32")
    with pytest.raises(ConfigError, match="datasets.mnist"):
        dataset_config(PARAMS, "mnist")


def test_dataset_without_shape():
    message = config_error(edited(("datasets", "photos32", "channels"), DELETE), DENSITY)
    assert_names(message, "datasets.photos32.channels", "positive integer", f"experiments.{DENSITY}")


@pytest.mark.parametrize("value", [32.7, "32", 0, True])
def test_dataset_image_size_must_be_a_positive_int(value):
    message = config_error(edited(("datasets", "photos32", "image_size"), value), DENSITY)
    assert_names(message, "datasets.photos32.image_size", "positive integer")


def test_dataset_flip_must_be_a_bool():
    message = config_error(edited(("datasets", "photos32", "flip"), "no"), DENSITY)
    assert_names(message, "datasets.photos32.flip", "true or false")


def test_image_size_in_model_points_to_the_dataset():
    message = config_error(edited(experiment_path(DENSITY, "model", "image_size"), 32), DENSITY)
    assert_names(message, f"experiments.{DENSITY}.model.image_size", "datasets.<name>.image_size")


# ---------------------------------------------------------------------------------------------
# Reading the file


def test_load_params_reads_a_broken_file_that_validation_rejects(tmp_path):
    params = copy.deepcopy(PARAMS)
    # a model of its own: through the YAML anchors its twins share the mapping
    model = params["experiments"][DENSITY]["model"]
    params["experiments"][DENSITY]["model"] = {**model, "nbitz": 5}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    loaded = load_params(path)
    assert loaded["experiments"][DENSITY]["model"]["nbitz"] == 5
    with pytest.raises(ConfigError) as info:
        validate_params(loaded)
    key = f"experiments.{DENSITY}.model.nbitz"
    assert_names(str(info.value), key, "unknown key", "Did you mean 'nbits'?")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("experiments: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping at the top level")],
)
def test_load_params_rejects_bad_yaml(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


# ---------------------------------------------------------------------------------------------
# Ranges: every numeric knob has one, and a value outside it is one line naming the dotted key


def _numeric_leaves(node, path: tuple = ()):
    """(path, value) of every number, and every non-empty list of numbers, below `node`."""
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield path, node
    elif isinstance(node, list) and node and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in node
    ):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numeric_leaves(value, (*path, key))


NUMERIC_KNOBS = [path for path, _ in _numeric_leaves(PARAMS)]


def _refused(params: dict) -> str:
    """What the stages check before any work: the experiments (every stage) and the datasets
    (the data stages)."""
    with pytest.raises(ConfigError) as info:
        validate_params(params)
        validate_datasets(params)
    return str(info.value)


def test_the_walk_finds_the_knobs_of_every_kind():
    dotted = {".".join(path) for path in NUMERIC_KNOBS}
    for key in ("trainer.num_workers", "bases.photos32.seed", "datasets.sprites.factors.hue",
                "bases.photos32.sample.temperatures", "bases.photos32.train.val_every_steps",
                f"experiments.{DENSITY}.model.h_size", "experiments.cifar10-sdn.reported.nll_bpd",
                "datasets.photos32.reductions"):
        assert key in dotted


@pytest.mark.parametrize("path", NUMERIC_KNOBS, ids=[".".join(p) for p in NUMERIC_KNOBS])
def test_every_numeric_knob_in_params_refuses_a_negative_value(path):
    # through JSON: params.yaml's anchors share sections between experiments; edit only this one
    params = json.loads(json.dumps(PARAMS))
    section = params
    for key in path[:-1]:
        section = section[key]
    value = section[path[-1]]
    section[path[-1]] = [-1, *value[1:]] if isinstance(value, list) else -1
    message = _refused(params)
    assert message.startswith(f"{'.'.join(path)}: ") and "\n" not in message, message


def _sections() -> list[tuple[str, type]]:
    """(params key, dataclass) of each section of an experiment, found from ExperimentConfig."""
    found = []
    for name, hint in typing.get_type_hints(ExperimentConfig).items():
        for cls in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(cls):
                found.append((name, cls))
    return found


@pytest.mark.parametrize(("section", "cls"), _sections(), ids=lambda x: getattr(x, "__name__", x))
def test_every_numeric_field_has_a_range_and_it_is_enforced(section, cls):
    hints = typing.get_type_hints(cls)
    numeric = [f for f in dataclasses.fields(cls) if mentions_number(hints[f.name])]
    missing = [f.name for f in numeric if not has_range(f)]
    assert not missing, f"{cls.__name__} fields without a range in their metadata (`ranged`): {missing}"
    experiment = BETA_VAE if cls is DisentanglementConfig else DENSITY
    for f in numeric:
        # a choice (checked by the section's code); set by the dataset
        if f.metadata["range"] is None or f.name in ("image_size", "channels"):
            continue
        params = json.loads(json.dumps(PARAMS))
        path = experiment_path(experiment, section)
        own = params[path[0]][path[1]].setdefault(section, {})
        own[f.name] = [-1] if typing.get_origin(hints[f.name]) is list else -1
        message = _refused(params)
        key = f"{'.'.join(path)}.{f.name}"
        assert message.startswith(f"{key}: ") and "must be" in message, message


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_numeric_dataset_setting_has_a_range_and_it_is_enforced(name):
    settings = SOURCES[name].settings
    hints = typing.get_type_hints(settings)
    numeric = [f for f in dataclasses.fields(settings) if mentions_number(hints[f.name])]
    assert not [f.name for f in numeric if not has_range(f)]
    for f in numeric:
        cfg = dict(PARAMS["datasets"][name])
        cfg[f.name] = -1
        with pytest.raises(ConfigError) as info:
            validate_datasets({"datasets": {name: cfg}})
        assert str(info.value).startswith(f"datasets.{name}.{f.name}: "), str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("trainer", "num_workers"), 1000, "between 0 and 256"),
        (experiment_path(DENSITY, "sample", "grid"), 65, "between 1 and 64"),
        (experiment_path(DENSITY, "train", "gradient_clip_val"), -1.0, "positive"),
        (experiment_path(DENSITY, "train", "val_batches"), -1, "non-negative"),
        (experiment_path(DENSITY, "sample", "interpolation_layers"), [5], "at most model.depth-1=3"),
        (experiment_path(DENSITY, "sample", "neighbourhood_layers"), 9, "at most model.depth=4"),
        (experiment_path(DENSITY, "sample", "temperatures"), [], "at least one temperature"),
        (experiment_path(DENSITY, "seed"), 2**32, "between 0 and 4294967295"),
        (("datasets", "sprites", "val_fraction"), 1.0, "in (0, 1)"),
        (("datasets", "photos32", "channels"), 1, "must be 3"),
        (experiment_path(DENSITY, "reported"), {"neg_elbo_bpd": "low"}, "expected a number"),
    ],
)
def test_values_past_the_upper_bounds_and_across_keys(path, value, expected):
    params = json.loads(json.dumps(PARAMS))
    section = params
    for key in path[:-1]:
        section = section.setdefault(key, {})
    section[path[-1]] = value
    message = _refused(params)
    key = ".".join(path) + (".neg_elbo_bpd" if isinstance(value, dict) else "")
    assert_names(message, key, expected)
