"""Importance-weighted likelihood on a linear-Gaussian VAE, whose log p(x) is known exactly."""

import math

import pytest
import torch
from torch import Tensor

from sdn.evaluation.likelihood import evaluate_density, importance_weighted_log_likelihood

OBS_DIM, LATENT_DIM = 4, 2


class LinearGaussianVAE:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I), and a deliberately imperfect q(z|x).

    q(z|x) is diagonal (the true posterior is not), its mean is shrunk and shifted and its
    variance doubled, so the ELBO is strictly below log p(x) and importance weighting has
    a gap to close.
    """

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(OBS_DIM, LATENT_DIM, generator=generator, dtype=torch.float64)
        self.bias = torch.randn(OBS_DIM, generator=generator, dtype=torch.float64)
        self.noise_std = 0.5
        precision = torch.eye(LATENT_DIM, dtype=torch.float64) + (
            self.weight.T @ self.weight / self.noise_std**2
        )
        self.posterior_cov = torch.linalg.inv(precision)
        self.q_std = (2 * self.posterior_cov.diagonal()).sqrt()
        # Default noise source: the global torch RNG, a fresh draw per call.
        self.draw_noise = lambda n: torch.randn(n, LATENT_DIM, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, LATENT_DIM, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, OBS_DIM, generator=generator, dtype=torch.float64)
        return z @ self.weight.T + self.bias + self.noise_std * noise

    def log_marginal(self, x: Tensor) -> Tensor:
        cov = self.weight @ self.weight.T + self.noise_std**2 * torch.eye(OBS_DIM).double()
        return torch.distributions.MultivariateNormal(self.bias, cov).log_prob(x)

    def elbo(self, x: Tensor) -> dict[str, Tensor]:
        true_mean = (x - self.bias) @ self.weight @ self.posterior_cov / self.noise_std**2
        q = torch.distributions.Normal(0.7 * true_mean + 0.1, self.q_std)
        z = q.loc + q.scale * self.draw_noise(x.shape[0])
        log_px_z = torch.distributions.Normal(z @ self.weight.T + self.bias, self.noise_std)
        kl = q.log_prob(z).sum(1) - torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        return {"elbo": log_px_z.log_prob(x).sum(1) - kl, "kl": kl}

    def elbo_tensor(self, x: Tensor) -> Tensor:
        return self.elbo(x)["elbo"]


@pytest.fixture
def model() -> LinearGaussianVAE:
    return LinearGaussianVAE()


def _data(model: LinearGaussianVAE, n: int) -> Tensor:
    return model.sample(n, torch.Generator().manual_seed(1))


def test_estimate_approaches_true_log_likelihood_as_k_grows(model: LinearGaussianVAE) -> None:
    torch.manual_seed(0)
    x = _data(model, 64)
    log_px = model.log_marginal(x)
    gaps = [
        (log_px - importance_weighted_log_likelihood(model.elbo, x, k, chunk_size=4096)).mean()
        for k in (1, 10, 100, 1000)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[0] > 0.2  # q is imperfect enough for the test to mean something
    assert abs(gaps[3]) < 0.05 * gaps[0]


@pytest.mark.parametrize("num_samples", [1, 10, 100])
def test_estimate_never_exceeds_log_likelihood_in_expectation(
    model: LinearGaussianVAE, num_samples: int
) -> None:
    torch.manual_seed(0)
    x = _data(model, 8)
    repeats = 500
    estimates = importance_weighted_log_likelihood(
        model.elbo, x.repeat(repeats, 1), num_samples, chunk_size=50_000
    ).view(repeats, -1)
    excess = estimates.mean(0) - model.log_marginal(x)
    stderr = estimates.std(0) / math.sqrt(repeats)
    assert (excess <= 4 * stderr).all(), (excess, stderr)


def test_single_sample_equals_elbo(model: LinearGaussianVAE) -> None:
    x = _data(model, 10)
    torch.manual_seed(3)
    elbo = model.elbo_tensor(x)
    torch.manual_seed(3)
    estimate = importance_weighted_log_likelihood(model.elbo_tensor, x, 1, chunk_size=10)
    assert torch.equal(estimate, elbo)


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 300])
def test_chunking_does_not_change_the_result(model: LinearGaussianVAE, chunk_size: int) -> None:
    num_images, num_samples = 6, 50
    x = _data(model, num_images)
    # Noise taken row by row from one table: every chunking sees the same noise per row.
    table = torch.randn(
        num_images * num_samples, LATENT_DIM, generator=torch.Generator().manual_seed(2)
    ).double()
    cursor, rows_per_call = 0, []

    def draw_from_table(n: int) -> Tensor:
        nonlocal cursor
        rows_per_call.append(n)
        cursor += n
        return table[cursor - n : cursor]

    model.draw_noise = draw_from_table
    estimate = importance_weighted_log_likelihood(model.elbo, x, num_samples, chunk_size)

    assert cursor == num_images * num_samples and max(rows_per_call) <= chunk_size

    # Reference: all K·B rows in one call, logsumexp over samples.
    cursor = 0
    elbo_grid = model.elbo_tensor(x.repeat(num_samples, 1)).view(num_samples, num_images)
    reference = elbo_grid.logsumexp(0) - math.log(num_samples)
    torch.testing.assert_close(estimate, reference, rtol=0, atol=1e-10)


def test_evaluate_density_bookkeeping() -> None:
    # A deterministic "ELBO": every importance sample is equal, so NLL = −ELBO exactly.
    def elbo_fn(x: Tensor) -> dict[str, Tensor]:
        return {"elbo": -(x**2).sum(1), "kl": x.abs().sum(1)}

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    results = evaluate_density(elbo_fn, batches, num_samples=4, chunk_size=7, dims_per_image=3)

    x = torch.cat(batches)
    bits = 3 * math.log(2)
    expected_elbo = (x**2).sum(1) / bits
    expected_kl = x.abs().sum(1) / bits
    assert set(results) == {
        "elbo_bpd", "elbo_bpd_se", "nll_bpd", "nll_bpd_se",
        "kl_bpd", "kl_bpd_se", "num_images", "num_samples",
    }  # fmt: skip
    assert results["num_images"] == 15 and results["num_samples"] == 4
    assert results["elbo_bpd"] == pytest.approx(expected_elbo.mean().item(), rel=1e-12)
    assert results["nll_bpd"] == pytest.approx(expected_elbo.mean().item(), rel=1e-12)
    assert results["kl_bpd"] == pytest.approx(expected_kl.mean().item(), rel=1e-12)
    assert results["elbo_bpd_se"] == pytest.approx(
        (expected_elbo.std() / math.sqrt(15)).item(), rel=1e-12
    )
    assert all(isinstance(v, float | int) for v in results.values())


@pytest.mark.parametrize("chunk_size", [3, 8, 1000])
def test_neg_elbo_is_one_sample_per_image(model: LinearGaussianVAE, chunk_size: int) -> None:
    """As released: −ELBO from a single sample per image (here the first of the K), not the
    mean of the K, and its KL from the same sample."""
    num_images, num_samples = 8, 5
    x = _data(model, num_images)
    table = torch.randn(
        num_images * num_samples, LATENT_DIM, generator=torch.Generator().manual_seed(4)
    ).double()
    cursor = 0

    def draw_from_table(n: int) -> Tensor:
        nonlocal cursor
        cursor += n
        return table[cursor - n : cursor]

    model.draw_noise = draw_from_table
    results = evaluate_density(
        model.elbo, [x], num_samples=num_samples, chunk_size=chunk_size, dims_per_image=OBS_DIM
    )
    bits = OBS_DIM * math.log(2)
    cursor = 0  # rows are sample-major: the first B rows are every image's first sample
    first = model.elbo(x)
    assert results["elbo_bpd"] == pytest.approx((-first["elbo"] / bits).mean().item(), rel=1e-12)
    assert results["kl_bpd"] == pytest.approx((first["kl"] / bits).mean().item(), rel=1e-12)
    cursor = 0
    all_samples = model.elbo_tensor(x.repeat(num_samples, 1))
    assert results["elbo_bpd"] != pytest.approx((-all_samples / bits).mean().item(), rel=1e-6)


def test_evaluate_density_on_linear_gaussian(model: LinearGaussianVAE) -> None:
    torch.manual_seed(0)
    x = _data(model, 200)
    results = evaluate_density(
        model.elbo_tensor, x.split(64), num_samples=200, chunk_size=1000, dims_per_image=OBS_DIM
    )
    true_nll_bpd = (-model.log_marginal(x) / (OBS_DIM * math.log(2))).mean().item()
    assert "kl_bpd" not in results
    assert true_nll_bpd < results["nll_bpd"] < results["elbo_bpd"]
    # 200 importance samples close 95% of the ELBO's gap to the true NLL.
    assert results["nll_bpd"] - true_nll_bpd < 0.05 * (results["elbo_bpd"] - true_nll_bpd)


def test_errors_name_the_problem() -> None:
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="num_samples"):
        importance_weighted_log_likelihood(lambda v: v.sum(1), x, 0, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        importance_weighted_log_likelihood(lambda v: v.sum(1), x, 2, 0)
    with pytest.raises(ValueError, match=r"one elbo value per image.*\(4,\)"):
        importance_weighted_log_likelihood(lambda v: v, x, 1, 8)
    with pytest.raises(ValueError, match="'elbo' key"):
        importance_weighted_log_likelihood(lambda v: {"loss": v.sum(1)}, x, 1, 8)
    with pytest.raises(TypeError, match="image tensors"):
        evaluate_density(lambda v: v.sum(1), [(x, x)], 2, 8, dims_per_image=3)
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate_density(lambda v: v.sum(1), [x[:1]], 2, 8, dims_per_image=3)
