"""The ladder's geometry and which layers are SDN layers, asked of one place (sdn.hyperparameters)
by the model, the config checks and the summary."""

from __future__ import annotations

import pytest

from sdn.config import experiment_config
from sdn.errors import ConfigError
from sdn.hyperparameters import (
    DensityConfig,
    DisentanglementConfig,
    conv_geometry,
    input_padding,
    ladder_scales,
    uses_sdn,
    uses_sdn_at,
)
from sdn.layers import DirectionCycle
from sdn.models.density import DensityVAE, plan_ladder
from sdn.params import load_params
from tests.params_tools import detach


def density(**overrides) -> DensityConfig:
    values = dict(image_size=32, channels=3, depth=15, ds_list=[5, 10], sdn_min_scale=0, sdn_max_scale=32)
    return DensityConfig(**{**values, **overrides})


def test_the_cifar10_ladder_works_at_32_16_and_8() -> None:
    # the paper's CIFAR-10 model: 15 layers, downsampling after layers 5 and 10
    layers, top = ladder_scales(density())
    assert [scale for scale, _ in layers] == [32] * 6 + [16] * 5 + [8] * 4
    assert [i for i, (_, down) in enumerate(layers) if down] == [5, 10]
    assert top == 8


def test_28x28_images_work_at_32x32_and_downsample_first_halves_the_start() -> None:
    assert (input_padding(28), input_padding(32)) == (2, 0)
    assert ladder_scales(density(image_size=28))[0][0] == (32, False)
    assert ladder_scales(density(image_size=256, downsample_first=True))[0][0] == (128, False)
    # a 1x1 map is not halved further
    layers, top = ladder_scales(density(image_size=2, depth=3, ds_list=[0, 1, 2]))
    assert (layers, top) == ([(2, True), (1, False), (1, False)], 1)


def test_halving_and_keeping_convolutions() -> None:
    assert conv_geometry(True) == (4, 2, 1) and conv_geometry(False) == (3, 1, 1)
    model = DensityVAE(density(image_size=8, depth=2, ds_list=[1], h_size=8, sdn_max_scale=0, z_size=2))
    assert model.first_layer.kernel_size == (3, 3) and model.ladder[1].up_a.stride == (2, 2)


def test_the_model_plan_follows_the_shared_rule() -> None:
    cfg = density(sdn_min_scale=16, sdn_max_scale=16, sdn_nfeat_0=60, sdn_num_dirs=1)
    plans, top = plan_ladder(cfg, DirectionCycle())
    assert [p.use_sdn for p in plans] == [False] * 6 + [True] * 5 + [False] * 4
    assert [p.use_sdn for p in plans] == [uses_sdn_at(cfg, p.scale) for p in plans]
    assert top == 8 and uses_sdn(cfg)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (density(sdn_max_scale=0), False),  # the CNN baselines
        (density(sdn_min_scale=0, sdn_max_scale=4), False),  # no layer works at 4x4 or below
        (density(sdn_min_scale=64, sdn_max_scale=32), True),  # the last layer: max reaches the image
        (DisentanglementConfig(sdn_min_scale=32, sdn_max_scale=32), True),
        (DisentanglementConfig(sdn_min_scale=65, sdn_max_scale=100), False),
    ],
)
def test_uses_sdn_asks_every_layer(cfg, expected: bool) -> None:
    assert uses_sdn(cfg) is expected


def test_sdn_features_are_required_only_where_a_layer_is_an_sdn_layer() -> None:
    params = load_params()
    model = detach(params, "photos32-sdn")["model"]
    # photos32's ladder works at 16, 8 and 4 (it downsamples first): an SDN range of 2..3 touches no
    # layer, so it needs no SDN features
    model.update(sdn_min_scale=2, sdn_max_scale=3, sdn_nfeat_0=0)
    assert not uses_sdn(experiment_config(params, "photos32-sdn").model)
    model.update(sdn_max_scale=4)
    with pytest.raises(ConfigError, match=r"photos32-sdn.model.sdn_nfeat_0: SDN layers need at least"):
        experiment_config(params, "photos32-sdn")
