"""Known answers for the disentanglement metrics: a code that copies the factors, a random code."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from sdn.evaluation.disentanglement import beta_vae, dci, factor_vae, mig, scores_with_errors
from sdn.evaluation.run import evaluate_experiment
from tests.evaluation_workdir import EvaluationWorkdir, micro_experiment

FACTOR_SIZES = (3, 4, 5, 6, 4)
CHANCE = 1 / len(FACTOR_SIZES)
# Small sample counts and few trees keep the suite fast; the answers are far from the bounds.
FAST = {
    beta_vae: {"num_train": 1000, "num_eval": 500},
    factor_vae: {"num_train": 1000, "num_eval": 500},
    dci: {"n_estimators": 10, "num_train": 1000, "num_test": 400},
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


def test_dci_uses_the_asked_images(factors: np.ndarray, random_code: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"num_train \+ num_test = 1500 distinct images, the set holds 1440"):
        dci(random_code, factors, num_train=1000, num_test=500)
    # disentanglement_lib's sizes are the defaults
    assert dci.__kwdefaults__["num_train"] == 10000 and dci.__kwdefaults__["num_test"] == 5000


def test_mig_on_a_subset(factors: np.ndarray, copied_code: np.ndarray, random_code: np.ndarray) -> None:
    assert mig(copied_code, factors, num_points=700, seed=1) > 0.9
    first = mig(random_code, factors, num_points=700, seed=1)
    assert first != mig(random_code, factors, num_points=700, seed=2)
    with pytest.raises(ValueError, match="num_points=2000 asks for more images than the set holds"):
        mig(copied_code, factors, num_points=2000)


SMALL = {
    "beta_vae_train": 300, "beta_vae_eval": 200, "factor_vae_train": 300, "factor_vae_eval": 200,
    "mig_points": 1000, "dci_train": 300, "dci_test": 200, "dci_estimators": 10,
}


@pytest.fixture(scope="module")
def scored(random_code: np.ndarray, factors: np.ndarray) -> dict[str, float]:
    return scores_with_errors(random_code, factors, repeats=5, seed=7, **SMALL)


def test_scores_come_with_standard_errors(scored: dict[str, float]) -> None:
    names = ["beta_vae", "factor_vae", "mig"] + [
        f"dci_{part}" for part in ("disentanglement", "completeness", "informativeness")
    ]
    assert set(scored) == set(names) | {f"{name}_se" for name in names}
    for name in names:
        assert 0 < scored[f"{name}_se"] < 0.2, (name, scored[f"{name}_se"])


def test_random_scores_are_the_mean_of_seeded_draws(
    scored: dict[str, float], random_code: np.ndarray, factors: np.ndarray
) -> None:
    draws = [beta_vae(random_code, factors, num_train=300, num_eval=200, seed=s) for s in range(7, 12)]
    assert scored["beta_vae"] == pytest.approx(np.mean(draws), abs=1e-12)
    assert scored["beta_vae_se"] == pytest.approx(np.std(draws, ddof=1) / np.sqrt(5), abs=1e-12)


def test_mig_error_is_a_bootstrap(
    scored: dict[str, float], random_code: np.ndarray, factors: np.ndarray
) -> None:
    # the score itself is MIG on the chosen images, not an average of resamples
    assert scored["mig"] == mig(random_code, factors, num_points=1000, seed=7)


def test_standard_errors_shrink_with_larger_samples(random_code: np.ndarray, factors: np.ndarray) -> None:
    larger = {**SMALL, "beta_vae_train": 2000, "beta_vae_eval": 2000}
    small = scores_with_errors(random_code, factors, repeats=6, seed=0, **SMALL)
    large = scores_with_errors(random_code, factors, repeats=6, seed=0, **larger)
    assert large["beta_vae_se"] < small["beta_vae_se"]


def test_one_repeat_has_no_error(random_code: np.ndarray, factors: np.ndarray) -> None:
    with pytest.raises(ValueError, match="repeats must be >= 2"):
        scores_with_errors(random_code, factors, repeats=1, **SMALL)


def test_evaluate_writes_every_score_with_its_error(tmp_path: Path) -> None:
    cfg = micro_experiment("sprites-cnn", evaluate={"disentanglement_repeats": 3})
    work = EvaluationWorkdir(tmp_path, cfg, train_images=200)
    evaluate_experiment(cfg, work.lmdb, work.ckpt, work.metrics)
    written = json.loads((work.metrics / "eval.json").read_text())
    for name in ("beta_vae", "factor_vae", "mig", "dci_disentanglement", "dci_completeness",
                 "dci_informativeness", "neg_elbo_bpd", "nll_bpd", "kl_bpd"):
        assert np.isfinite(written[name]) and written[f"{name}_se"] >= 0, name
    assert written["disentanglement_images"] == 200


def test_parallel_draws_give_the_same_scores(scored: dict[str, float], random_code, factors) -> None:
    assert scores_with_errors(random_code, factors, repeats=5, seed=7, n_jobs=2, **SMALL) == scored
