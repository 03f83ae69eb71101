"""Probability models: normalisation, sampling against the likelihood, the IAF's density and
masks, the KL estimate, and the data transforms."""

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from sdn import hyperparameters
from sdn.models.latents import (
    POSTERIOR_MODELS,
    PRIOR_MODELS,
    IAFPosterior,
    IsoGaussianPosterior,
    IsoGaussianPrior,
    build_posterior,
    build_prior,
)
from sdn.models.observations import (
    OBSERVATION_MODELS,
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedMixLogistic,
    ObservationModel,
    build_observation,
)


def model_nbits(model: ObservationModel) -> int:
    return getattr(model, "nbits", 1)  # Bernoulli data is binary: one bit


def images_at_levels(levels: Tensor, nbits: int) -> Tensor:
    """The darkest uint8 pixel of each quantisation level."""
    return (levels.long() * 2 ** (8 - nbits)).to(torch.uint8)


def all_pixel_values(model: ObservationModel, channels: int) -> Tensor:
    """Every value one pixel can take, in data space: (levels^C, C, 1, 1)."""
    nbits = model_nbits(model)
    grid = itertools.product(range(2**nbits), repeat=channels)
    levels = torch.tensor(list(grid)).reshape(-1, channels, 1, 1)
    return model.preprocess(images_at_levels(levels, nbits))


def random_pixel_params(model: ObservationModel, channels: int, generator) -> Tensor:
    """Parameters for one pixel, wide enough to put mass in the end bins and far tails."""
    count = model.num_params(channels)
    params = torch.randn(1, count, 1, 1, generator=generator) * 2.0
    if isinstance(model, DiscretizedMixLogistic):
        mix = model.mix_components
        per_channel = params[:, mix:].view(channels, -1, mix)
        per_channel[:, 0] = torch.rand(channels, mix, generator=generator) * 2.6 - 1.3
        per_channel[:, 1] = torch.rand(channels, mix, generator=generator) * 7.5 - 7.0
    return params


def pixel_probabilities(model: ObservationModel, params: Tensor, values: Tensor) -> Tensor:
    log_probs = model.log_prob(values, params.expand(len(values), -1, -1, -1))
    return log_probs.double().exp()


# ---------------------------------------------------------------------------------------------
# Normalisation and sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, channels",
    [
        (DiscretizedMixLogistic(channels=3, mix_components=5, nbits=5), 3),
        (DiscretizedMixLogistic(channels=1, mix_components=4, nbits=8), 1),
        (Bernoulli(), 3),
    ],
    ids=["dml-rgb-5bit", "dml-gray-8bit", "bernoulli"],
)
def test_probabilities_of_all_pixel_values_sum_to_one(model, channels):
    generator = torch.Generator().manual_seed(0)
    values = all_pixel_values(model, channels)  # 32^3 values for the RGB DML
    for _ in range(4):
        params = random_pixel_params(model, channels, generator)
        total = pixel_probabilities(model, params, values).sum().item()
        assert total == pytest.approx(1.0, abs=1e-4)


def test_discretized_logistic_has_one_global_log_scale():
    model = DiscretizedLogistic(nbits=8)
    assert [name for name, _ in model.named_parameters()] == ["log_scale"]
    assert model.log_scale.numel() == 1
    assert model.num_params(3) == 3


@pytest.mark.parametrize(
    "model, channels",
    [
        (DiscretizedMixLogistic(channels=3, mix_components=3, nbits=2), 3),
        (DiscretizedMixLogistic(channels=1, mix_components=3, nbits=2), 1),
        (Bernoulli(), 2),
    ],
    ids=["dml-rgb-uncoupled", "dml-gray", "bernoulli"],
)
def test_sample_frequencies_match_log_prob(model, channels):
    """Sampling draws from the distribution log_prob scores. As released, the DML's sampling
    couples RGB channels on continuous values and log_prob on the grid's, so they agree exactly
    only with the coupling coefficients at 0; the DL (as released) is not normalised at all."""
    generator = torch.Generator().manual_seed(1)
    params = random_pixel_params(model, channels, generator)
    if isinstance(model, DiscretizedMixLogistic) and model.coupled:
        mix = model.mix_components
        params[:, mix:].view(channels, -1, mix)[:, 2] = 0.0  # tanh(0): no coupling
    values = all_pixel_values(model, channels)
    expected = pixel_probabilities(model, params, values)

    torch.manual_seed(2)
    num_samples = 200_000
    samples = model.sample(params.expand(num_samples, -1, -1, -1))
    # Identify each sample with its row in `values` via its per-channel levels.
    levels = torch.round(model.postprocess(samples) * (2 ** model_nbits(model) - 1)).long()
    index = torch.zeros(num_samples, dtype=torch.long)
    for channel in range(channels):
        index = index * 2 ** model_nbits(model) + levels[:, channel, 0, 0]
    observed = torch.bincount(index, minlength=len(values)).double() / num_samples
    # 200k draws: a cell's standard error is <= 0.0011, so 0.006 is over 5 of them.
    assert (observed - expected).abs().max().item() < 0.006


# ---------------------------------------------------------------------------------------------
# DML specifics
# ---------------------------------------------------------------------------------------------


def test_dml_parameter_counts():
    assert DiscretizedMixLogistic(3, 10).num_params(3) == 10 + 3 * 3 * 10
    assert DiscretizedMixLogistic(1, 10).num_params(1) == 10 + 2 * 10
    with pytest.raises(ValueError, match="3 channels"):
        DiscretizedMixLogistic(3, 10).num_params(1)


def test_dml_parameter_layout_and_rgb_coupling():
    """M logits, then per channel: M means, M log-scales, M coefficients. The mode couples each
    channel to the earlier channels' continuous values clamped to [-1, 1] (the release's
    get_mean), and only the result is snapped to the grid."""
    mix = 2
    model = DiscretizedMixLogistic(channels=3, mix_components=mix, nbits=8)
    params = torch.zeros(1, model.num_params(3), 1, 1)
    params[0, :mix, 0, 0] = torch.tensor([0.0, 5.0])  # component 1 is the most likely

    def block(channel: int, field: int) -> int:  # field 0 means, 1 log-scales, 2 coefficients
        return mix + channel * 3 * mix + field * mix + 1

    def on_grid(value: float) -> float:
        return round((value + 1) / 2 * 255) / 255 * 2 - 1

    red, green, blue = 0.2, -0.3, 0.5
    for channel, mean in enumerate([red, green, blue]):
        params[0, block(channel, 0)] = mean
    expected = [on_grid(red), on_grid(green), on_grid(blue)]
    assert model.mode(params)[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)

    params[0, block(0, 2)] = math.atanh(0.5)  # c0: green += 0.5 * red
    params[0, block(1, 2)] = math.atanh(-0.25)  # c1: blue += -0.25 * red
    params[0, block(2, 2)] = math.atanh(0.75)  # c2: blue += 0.75 * green
    r = red
    g = green + 0.5 * r
    b = blue - 0.25 * r + 0.75 * g
    got = model.mode(params)[0, :, 0, 0].tolist()
    assert got == pytest.approx([on_grid(r), on_grid(g), on_grid(b)], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# IAF
# ---------------------------------------------------------------------------------------------


def tiny_iaf(seed: int) -> tuple[IAFPosterior, Tensor]:
    torch.manual_seed(seed)
    posterior = IAFPosterior(z_size=2).double()
    with torch.no_grad():
        posterior.ar_output.weight.mul_(10.0)  # a flow far from the identity
    params = torch.randn(1, posterior.num_params, 3, 3, dtype=torch.float64)
    return posterior, params


def test_iaf_log_density_is_the_change_of_variables_density():
    posterior, params = tiny_iaf(seed=0)
    assert posterior.context_size == 100 and posterior.num_params == 104
    mean, logvar, context = params.split([2, 2, 100], dim=1)

    torch.manual_seed(1)
    z, log_q = posterior(params)
    torch.manual_seed(1)
    eps = torch.randn_like(mean)  # the noise forward drew

    def z_of_eps(flat_eps: Tensor) -> Tensor:
        z0 = mean + torch.exp(0.5 * logvar) * flat_eps.view_as(mean)
        return posterior.mode(torch.cat([z0, logvar, context], dim=1)).flatten()

    assert torch.allclose(z_of_eps(eps.flatten()), z.flatten())
    jacobian = torch.autograd.functional.jacobian(z_of_eps, eps.flatten())
    log_normal = -0.5 * (eps**2 + math.log(2 * math.pi))
    expected = log_normal.sum() - torch.linalg.slogdet(jacobian).logabsdet
    assert log_q.shape == mean.shape
    assert log_q.sum().item() == pytest.approx(expected.item(), abs=1e-9)


def orthogonal_then(weight_norm):
    """As the trainer prepares a model: orthogonal init of every conv, then weight norm."""

    def prepare(module: nn.Module) -> None:
        for conv in [m for m in module.modules() if isinstance(m, nn.Conv2d)]:
            nn.init.orthogonal_(conv.weight)  # fills the masked-out taps too
            if weight_norm is not None:
                weight_norm(conv)

    return prepare


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize(
    "prepare",
    [
        lambda module: None,
        orthogonal_then(None),
        orthogonal_then(torch.nn.utils.parametrizations.weight_norm),
        orthogonal_then(torch.nn.utils.weight_norm),
    ],
    ids=["as-built", "orthogonal", "parametrizations.weight_norm", "utils.weight_norm"],
)
def test_iaf_jacobian_is_triangular_in_raster_order(prepare):
    posterior, params = tiny_iaf(seed=3)
    prepare(posterior)
    z0, logvar, context = params.split([2, 2, 100], dim=1)

    def flow(flat_z0: Tensor) -> Tensor:
        return posterior.mode(torch.cat([flat_z0.view_as(z0), logvar, context], 1)).flatten()

    # (channel, row, col) -> (raster position, channel) on both sides.
    jacobian = torch.autograd.functional.jacobian(flow, z0.flatten())
    jacobian = jacobian.view(2, 9, 2, 9).permute(1, 0, 3, 2)  # [out pos, out ch, in pos, in ch]
    for out_pos, in_pos in itertools.product(range(9), repeat=2):
        block = jacobian[out_pos, :, in_pos]
        if in_pos > out_pos:
            assert torch.count_nonzero(block) == 0, (out_pos, in_pos)
        elif in_pos == out_pos:  # a position's own value only scales it: diagonal
            assert torch.count_nonzero(block - torch.diag(torch.diagonal(block))) == 0
            assert (torch.diagonal(block) > 0).all()
    # ...and the flow does use earlier positions (left and upper-left neighbours).
    assert torch.count_nonzero(jacobian[1, :, 0]) > 0
    assert torch.count_nonzero(jacobian[8, :, 4]) > 0


# ---------------------------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------------------------


def test_single_sample_kl_estimate_averages_to_analytic_kl():
    torch.manual_seed(0)
    z_size, num_samples = 3, 40_000
    posterior, prior = build_posterior("IsoGaussian", z_size), build_prior("IsoGaussian", z_size)
    q_params = torch.randn(1, posterior.num_params, 2, 2, dtype=torch.float64)
    p_params = torch.randn(1, prior.num_params, 2, 2, dtype=torch.float64)

    z, log_q = posterior(q_params.expand(num_samples, -1, -1, -1))
    normal = torch.distributions.Normal(*_mean_and_std(q_params))
    assert torch.allclose(log_q, normal.log_prob(z))
    kl = log_q - prior.log_prob(z, p_params.expand(num_samples, -1, -1, -1))

    analytic = torch.distributions.kl_divergence(
        torch.distributions.Normal(*_mean_and_std(q_params)),
        torch.distributions.Normal(*_mean_and_std(p_params)),
    )[0]
    standard_error = kl.std(dim=0) / math.sqrt(num_samples)
    assert ((kl.mean(dim=0) - analytic).abs() < 5 * standard_error).all()


def _mean_and_std(params: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = params.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar)


def test_prior_temperature_scales_the_standard_deviation():
    torch.manual_seed(0)
    prior = IsoGaussianPrior(z_size=2)
    params = torch.randn(1, prior.num_params, 3, 3).expand(50_000, -1, -1, -1)
    mean, std = _mean_and_std(params[:1])
    assert torch.equal(prior.sample(params[:1], temperature=0.0), mean)
    assert torch.equal(prior.mode(params[:1]), mean)
    samples = prior.sample(params, temperature=0.5)
    assert torch.allclose(samples.std(dim=0), 0.5 * std[0], rtol=0.03)


def test_posterior_modes():
    posterior = IsoGaussianPosterior(z_size=4)
    params = torch.randn(2, posterior.num_params, 3, 3)
    assert torch.equal(posterior.mode(params), params[:, :4])
    iaf = IAFPosterior(z_size=4)
    assert iaf.mode(torch.randn(2, iaf.num_params, 3, 3)).shape == (2, 4, 3, 3)


# ---------------------------------------------------------------------------------------------
# Data transforms, grids, temperatures, names
# ---------------------------------------------------------------------------------------------

OBSERVATIONS = [
    ("DML", 3, 10, 8),
    ("DML", 3, 4, 5),
    ("DML", 1, 3, 3),
    ("DL", 3, 1, 8),
    ("DL", 1, 1, 4),
    ("Bernoulli", 3, 1, 8),
]


@pytest.fixture(params=OBSERVATIONS, ids=lambda spec: f"{spec[0]}-C{spec[1]}-{spec[3]}bit")
def observation(request) -> tuple[ObservationModel, int]:
    name, channels, mix_components, nbits = request.param
    return build_observation(name, channels, mix_components, nbits), channels


def random_params(model: ObservationModel, channels: int) -> Tensor:
    return torch.randn(2, model.num_params(channels), 5, 4) * 1.5


def assert_on_grid(model: ObservationModel, x: Tensor) -> None:
    """x equals preprocess() of the image it saves to: exactly a grid value."""
    nbits = model_nbits(model)
    levels = model.postprocess(x) * (2**nbits - 1)
    assert torch.equal(levels, levels.round())
    assert torch.equal(model.preprocess(images_at_levels(levels.round(), nbits)), x.float())


def test_preprocess_postprocess_round_trip(observation):
    model, channels = observation
    nbits = model_nbits(model)
    images = torch.randint(0, 256, (2, channels, 6, 5), dtype=torch.uint8)
    x = model.preprocess(images)
    assert x.dtype == torch.float32
    levels = images.long() // 2 ** (8 - nbits)
    assert torch.equal(model.postprocess(x), levels.float() / (2**nbits - 1))
    assert_on_grid(model, x)


def test_preprocess_data_ranges():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert DiscretizedMixLogistic(1, 2, 8).preprocess(images).flatten().tolist() == [-1.0, 1.0]
    assert DiscretizedLogistic(8).preprocess(images).flatten().tolist() == [-0.5, 0.5]
    binary = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 1, 4)
    assert Bernoulli().preprocess(binary).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(TypeError, match="uint8"):
        Bernoulli().preprocess(binary.float())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_samples_lie_on_the_grid(observation, temperature):
    model, channels = observation
    torch.manual_seed(0)
    samples = model.sample(random_params(model, channels), temperature)
    assert samples.shape == (2, channels, 5, 4)
    assert_on_grid(model, samples)


def test_zero_temperature_sampling_is_the_deterministic_mode(observation):
    model, channels = observation
    params = random_params(model, channels)
    torch.manual_seed(1)
    first = model.sample(params, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(model.sample(params, temperature=0.0), first)
    assert torch.equal(model.mode(params), first)
    assert_on_grid(model, first)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(params, temperature=-1.0)


@pytest.mark.parametrize("spec", [spec for spec in OBSERVATIONS if spec[0] != "DML"], ids=lambda s: s[0])
def test_low_temperature_samples_approach_the_mode(spec):
    """DL and Bernoulli. The DML draws its mixture component from softmax(logits) at any
    temperature, as released (tests/test_fidelity.py)."""
    name, channels, mix_components, nbits = spec
    model = build_observation(name, channels, mix_components, nbits)
    params = random_params(model, channels)
    torch.manual_seed(3)
    samples = model.sample(params.repeat(20, 1, 1, 1), temperature=1e-6)
    agreement = (samples == model.mode(params).repeat(20, 1, 1, 1)).float().mean()
    assert agreement.item() > 0.95


def test_half_precision_params_are_scored_in_float32(observation):
    model, channels = observation
    params = random_params(model, channels).bfloat16()
    x = model.preprocess(torch.randint(0, 256, (2, channels, 5, 4), dtype=torch.uint8))
    log_prob = model.log_prob(x, params)  # as under autocast: float32 data, bf16 decoder
    assert log_prob.dtype == torch.float32
    assert torch.allclose(log_prob, model.log_prob(x, params.float()))


def test_log_prob_is_per_image_and_differentiable(observation):
    model, channels = observation
    params = random_params(model, channels).requires_grad_()
    x = model.preprocess(torch.randint(0, 256, (2, channels, 5, 4), dtype=torch.uint8))
    log_prob = model.log_prob(x, params)
    assert log_prob.shape == (2,)
    assert (log_prob < 0).all()
    log_prob.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_unknown_names_raise_with_the_choices():
    with pytest.raises(ValueError, match="IAF.*IsoGaussian"):
        build_posterior("Flow", 4)
    with pytest.raises(ValueError, match="IsoGaussian"):
        build_prior("Laplace", 4)
    with pytest.raises(ValueError, match="DML.*DL.*Bernoulli"):
        build_observation("Gaussian", 3, 10, 8)
    with pytest.raises(ValueError, match="nbits"):
        build_observation("DML", 3, 10, 9)
    assert isinstance(build_posterior("IAF", 4), IAFPosterior)
    assert isinstance(build_observation("DL", 3, 10, 8), DiscretizedLogistic)


def test_name_tables_match_the_configuration_choices():
    # the configuration validates names against torch-free tuples; the builders use these tables
    assert tuple(POSTERIOR_MODELS) == hyperparameters.POSTERIORS
    assert tuple(PRIOR_MODELS) == hyperparameters.PRIORS
    assert tuple(OBSERVATION_MODELS) == hyperparameters.OBSERVATIONS
