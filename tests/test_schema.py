"""Datasets and experiments are checked by one mechanism: the same words for an unknown key, a
wrong type and a missing key, each naming the dotted key."""

from __future__ import annotations

import copy

import pytest

from sdn.config import validate_params
from sdn.data.sources import make_source
from sdn.errors import ConfigError
from sdn.hyperparameters import OBSERVATIONS, POSTERIORS, PRIORS
from sdn.models.latents import build_posterior, build_prior
from sdn.models.observations import build_observation
from sdn.params import load_params

PARAMS = load_params()
CIFAR10 = PARAMS["datasets"]["cifar10"]


def refused(check, *args) -> str:
    with pytest.raises(ConfigError) as info:
        check(*args)
    return str(info.value)


def test_a_misspelt_dataset_setting_gets_a_suggestion() -> None:
    message = refused(make_source, "cifar10", {**CIFAR10, "flipp": True})
    assert message == "datasets.cifar10.flipp: unknown setting for this dataset. Did you mean 'flip'?"
    assert refused(make_source, "cifar1", CIFAR10).endswith("no data source is implemented for it. "
                                                             "Did you mean 'cifar10'?")


def test_datasets_and_experiments_name_a_wrong_type_alike() -> None:
    dataset = refused(make_source, "cifar10", {**CIFAR10, "image_size": "32"})
    assert dataset == "datasets.cifar10.image_size: expected int, got str '32'."
    params = copy.deepcopy(PARAMS)
    params["experiments"]["photos32-sdn"].setdefault("train", {})["lr"] = "fast"
    experiment = refused(validate_params, params)
    assert experiment == "experiments.photos32-sdn.train.lr: expected float, got str 'fast'."


def test_datasets_and_experiments_name_a_missing_key_alike() -> None:
    settings = {key: value for key, value in CIFAR10.items() if key != "url"}
    assert refused(make_source, "cifar10", settings) == "datasets.cifar10.url: missing; it is required (str)."
    params = copy.deepcopy(PARAMS)
    params["experiments"]["photos32-sdn"]["release"] = {"url": "https://example.org/x.ckpt", "file": "x.ckpt"}
    assert refused(validate_params, params) == (
        "experiments.photos32-sdn.release.sha256: missing; it is required (str or null)."
    )


def test_every_model_name_the_configuration_accepts_can_be_built() -> None:
    assert [type(build_posterior(name, 2)).__name__ for name in POSTERIORS] == ["IAFPosterior",
                                                                             "IsoGaussianPosterior"]
    assert [type(build_prior(name, 2)).__name__ for name in PRIORS] == ["IsoGaussianPrior"]
    assert [type(build_observation(name, 3, 2, 8)).__name__ for name in OBSERVATIONS] == [
        "DiscretizedMixLogistic", "DiscretizedLogistic", "Bernoulli"
    ]
