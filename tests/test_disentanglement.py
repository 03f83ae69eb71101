"""Known answers for the disentanglement metrics: a code that copies the factors, a random code."""

import itertools

import numpy as np
import pytest

from sdn.evaluation.disentanglement import beta_vae, dci, factor_vae, mig

FACTOR_SIZES = (3, 4, 5, 6, 4)
CHANCE = 1 / len(FACTOR_SIZES)
# Small sample counts and few trees keep the suite fast; the answers are far from the bounds.
FAST = {
    beta_vae: {"num_train": 1000, "num_eval": 500},
    factor_vae: {"num_train": 1000, "num_eval": 500},
    dci: {"n_estimators": 10},
}


@pytest.fixture(scope="module")
def factors() -> np.ndarray:
    """Every combination of the factor values once, like 3DShapes: 1440 images."""
    return np.array(list(itertools.product(*(range(n) for n in FACTOR_SIZES))))


@pytest.fixture(scope="module")
def copied_code(factors: np.ndarray) -> np.ndarray:
    """Each factor in its own dimension (permuted, rescaled, slightly noisy) + 3 noise dims."""
    rng = np.random.default_rng(0)
    noisy = factors + 0.05 * rng.standard_normal(factors.shape)
    scales = np.array([0.5, 2.0, 10.0, 1.0, 0.2])
    nuisance = rng.standard_normal((len(factors), 3))
    return np.concatenate([(noisy * scales)[:, [2, 0, 4, 1, 3]], nuisance], axis=1)


@pytest.fixture(scope="module")
def random_code(factors: np.ndarray) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((len(factors), 8))


def test_beta_vae_known_answers(
    factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray
) -> None:
    assert beta_vae(copied_code, factors, **FAST[beta_vae]) > 0.95
    assert beta_vae(random_code, factors, **FAST[beta_vae]) == pytest.approx(CHANCE, abs=0.07)


def test_factor_vae_known_answers(
    factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray
) -> None:
    assert factor_vae(copied_code, factors, **FAST[factor_vae]) > 0.95
    assert factor_vae(random_code, factors, **FAST[factor_vae]) == pytest.approx(CHANCE, abs=0.07)


def test_factor_vae_ignores_collapsed_dimensions(factors: np.ndarray, copied_code: np.ndarray) -> None:
    # A constant dimension has no variance: unpruned, its 0/0 ratio (NaN) would win every vote.
    collapsed = np.concatenate([copied_code, np.full((len(factors), 1), 3.0)], axis=1)
    assert factor_vae(collapsed, factors, **FAST[factor_vae]) > 0.95
    assert factor_vae(np.zeros((len(factors), 4)), factors, **FAST[factor_vae]) == 0.0


def test_mig_known_answers(factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray) -> None:
    assert mig(copied_code, factors) > 0.9
    assert mig(random_code, factors) == pytest.approx(0.0, abs=0.03)


def test_dci_known_answers(factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray) -> None:
    copied = dci(copied_code, factors, **FAST[dci])
    assert set(copied) == {"disentanglement", "completeness", "informativeness"}
    assert min(copied.values()) > 0.9
    random = dci(random_code, factors, **FAST[dci])
    assert random["disentanglement"] < 0.2 and random["completeness"] < 0.2
    chance_accuracy = np.mean([1 / n for n in FACTOR_SIZES])
    assert random["informativeness"] < chance_accuracy + 0.1


@pytest.mark.parametrize("metric", [beta_vae, factor_vae, dci])
def test_same_seed_same_result(metric, factors: np.ndarray, random_code: np.ndarray) -> None:
    first = metric(random_code, factors, seed=3, **FAST[metric])
    assert metric(random_code, factors, seed=3, **FAST[metric]) == first
    assert metric(random_code, factors, seed=4, **FAST[metric]) != first


def test_inputs_are_validated(factors: np.ndarray, copied_code: np.ndarray) -> None:
    with pytest.raises(ValueError, match="same images"):
        mig(copied_code[:-1], factors)
    with pytest.raises(ValueError, match="integer class labels"):
        mig(copied_code, factors.astype(float))
    with pytest.raises(ValueError, match="codes must be a 2-D array"):
        mig(copied_code[:, 0], factors)
    with pytest.raises(ValueError, match="factor 1 takes a single value"):
        mig(copied_code, np.stack([factors[:, 0], np.zeros(len(factors), int)], axis=1))
    with pytest.raises(ValueError, match="finite"):
        mig(np.where(copied_code > 5, np.nan, copied_code), factors)
    with pytest.raises(ValueError, match="at least 2 factors"):
        beta_vae(copied_code, factors[:, :1])
    with pytest.raises(ValueError, match="at least 2 code dimensions"):
        dci(copied_code[:, :1], factors)
    with pytest.raises(ValueError, match="num_train must be >= 1"):
        factor_vae(copied_code, factors, num_train=0)


def test_any_integer_labels_are_accepted(
    factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray
) -> None:
    # Labels need not be 0..n−1: only which images share a value matters.
    relabelled = factors * 7 - 100
    assert mig(copied_code, relabelled) == mig(copied_code, factors)
    fast = FAST[factor_vae]
    assert factor_vae(random_code, relabelled, **fast) == factor_vae(random_code, factors, **fast)
