"""Disentanglement metrics on a fixed labelled set: β-VAE, FactorVAE, MIG and DCI.

Each metric takes ``codes`` (N×d floats, e.g. posterior means of N images) and ``factors``
(N×K integers: the ground-truth factor values of the same images) and follows the
definitions of disentanglement_lib (Locatello et al., "Challenging Common Assumptions in the
Unsupervised Learning of Disentangled Representations", ICML 2019) and its default settings.

disentanglement_lib draws fresh images from a ground-truth simulator; here the labelled set is
fixed, so "images that share factor k's value" are drawn (with replacement) from the points of
the set whose factor k has that value. On a set that covers the full factor grid, such as
3DShapes, this is the same distribution as the simulator's.
"""

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score
from sklearn.utils.parallel import Parallel, delayed

# Sampled pairs and batches are built this many training points at a time, so that memory
# stays near block × batch_size × d floats however many points are asked for.
_BLOCK = 1024


def _validate(
    codes: np.ndarray, factors: np.ndarray, *, min_factors: int = 1, min_dims: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Check the inputs; return float64 codes and factors relabelled to 0..n_k−1 per column."""
    codes = np.asarray(codes)
    factors = np.asarray(factors)
    if codes.ndim != 2:
        raise ValueError(
            f"codes must be a 2-D array (N images × d code dimensions), got shape {codes.shape}; "
            "reshape a single code dimension with codes.reshape(-1, 1)."
        )
    if factors.ndim != 2:
        raise ValueError(
            f"factors must be a 2-D array (N images × K factors), got shape {factors.shape}; "
            "reshape a single factor with factors.reshape(-1, 1)."
        )
    if codes.shape[0] != factors.shape[0]:
        raise ValueError(
            f"codes and factors must describe the same images: codes has {codes.shape[0]} rows, "
            f"factors has {factors.shape[0]}."
        )
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(
            f"factors must be integer class labels, got dtype {factors.dtype}; map each factor's "
            "values to 0..n_k−1 first, e.g. np.unique(column, return_inverse=True)[1]."
        )
    if not np.issubdtype(codes.dtype, np.number) or not np.isfinite(codes).all():
        raise ValueError("codes must be finite numbers; found NaN, inf or a non-numeric dtype.")
    if factors.shape[1] < min_factors:
        raise ValueError(f"this metric needs at least {min_factors} factors, got {factors.shape[1]}.")
    if codes.shape[1] < min_dims:
        raise ValueError(f"this metric needs at least {min_dims} code dimensions, got {codes.shape[1]}.")
    relabelled = np.empty(factors.shape, dtype=np.int64)
    for k in range(factors.shape[1]):
        values, relabelled[:, k] = np.unique(factors[:, k], return_inverse=True)
        if len(values) < 2:
            raise ValueError(
                f"factor {k} takes a single value ({values[0]}) on all {len(factors)} images; "
                "a factor of variation needs at least 2 values: drop that column."
            )
    return codes.astype(np.float64), relabelled


def _check_positive(**counts: int) -> None:
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}.")


class _FactorGroups:
    """The images sharing each value of each factor, to draw images with a given value."""

    def __init__(self, factors: np.ndarray) -> None:
        num_factors = factors.shape[1]
        # order[k] lists the image indices sorted by factor k, so each value is one slice.
        self.order = np.argsort(factors, axis=0, kind="stable").T
        self.counts = np.zeros((num_factors, factors.max() + 1), dtype=np.int64)
        for k in range(num_factors):
            column_counts = np.bincount(factors[:, k])
            self.counts[k, : len(column_counts)] = column_counts
        self.starts = np.cumsum(self.counts, axis=1) - self.counts

    def sample(
        self, factor: np.ndarray, value: np.ndarray, size: int, rng: np.random.Generator
    ) -> np.ndarray:
        """For each (factor[i], value[i]), ``size`` random images with that value: (n, size)."""
        factor, value = factor[:, None], value[:, None]
        offsets = (rng.random((len(factor), size)) * self.counts[factor, value]).astype(np.int64)
        return self.order[factor, self.starts[factor, value] + offsets]


def beta_vae(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    seed: int = 0,
) -> float:
    """The β-VAE metric (Higgins et al., ICLR 2017): accuracy of predicting the fixed factor.

    Each training point fixes a factor k uniformly at random, draws ``batch_size`` pairs of
    images that share factor k's value (the first image of a pair uniformly from the set, the
    second among the images with the first's value of factor k), and takes as features the
    mean over pairs of |code₁ − code₂|. A logistic regression learns k from ``num_train`` such
    points; the score is its accuracy on ``num_eval`` fresh points (chance: 1/K). High when
    each factor is captured by code dimensions that no other factor moves.
    """
    codes, factors = _validate(codes, factors, min_factors=2)
    _check_positive(batch_size=batch_size, num_train=num_train, num_eval=num_eval)
    rng = np.random.default_rng(seed)
    groups = _FactorGroups(factors)

    def features(num_points: int) -> tuple[np.ndarray, np.ndarray]:
        fixed = rng.integers(factors.shape[1], size=num_points)
        points = np.empty((num_points, codes.shape[1]))
        for start in range(0, num_points, _BLOCK):
            block = fixed[start : start + _BLOCK]
            first = rng.integers(len(codes), size=(len(block), batch_size))
            shared_value = factors[first, block[:, None]]
            second = groups.sample(np.repeat(block, batch_size), shared_value.ravel(), 1, rng).reshape(
                first.shape
            )
            points[start : start + _BLOCK] = np.abs(codes[first] - codes[second]).mean(axis=1)
        return points, fixed

    train_points, train_labels = features(num_train)
    # disentanglement_lib uses sklearn's defaults; more iterations only let lbfgs converge.
    model = LogisticRegression(max_iter=1000)
    model.fit(train_points, train_labels)
    eval_points, eval_labels = features(num_eval)
    return float(model.score(eval_points, eval_labels))


def factor_vae(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    batch_size: int = 64,
    num_train: int = 10000,
    num_eval: int = 5000,
    num_variance_estimate: int = 10000,
    prune_threshold: float = 0.05,
    seed: int = 0,
) -> float:
    """The FactorVAE metric (Kim & Mnih, ICML 2018): majority vote on the quietest dimension.

    Code dimensions are scaled by their global variance, estimated on up to
    ``num_variance_estimate`` images; dimensions whose global standard deviation is below
    ``prune_threshold`` (collapsed to the prior) are dropped. Each vote fixes a factor k
    uniformly at random and the value of k of a random image, draws ``batch_size`` images with
    that value, and pairs k with the active dimension of least normalised variance over the
    batch. A majority-vote classifier (dimension → factor) is fitted on ``num_train`` votes;
    the score is its accuracy on ``num_eval`` fresh votes (chance: 1/K; 0 when no dimension is
    active).
    """
    codes, factors = _validate(codes, factors)
    _check_positive(
        batch_size=batch_size,
        num_train=num_train,
        num_eval=num_eval,
        num_variance_estimate=num_variance_estimate,
    )
    if batch_size < 2 or num_variance_estimate < 2 or len(codes) < 2:
        raise ValueError(
            "factor_vae needs at least 2 images, batch_size >= 2 and num_variance_estimate >= 2 "
            "to estimate variances."
        )
    rng = np.random.default_rng(seed)
    num_images, num_dims = codes.shape
    variance_sample = rng.choice(num_images, min(num_images, num_variance_estimate), replace=False)
    global_variances = codes[variance_sample].var(axis=0, ddof=1)
    active_dims = np.flatnonzero(np.sqrt(global_variances) >= prune_threshold)
    if len(active_dims) == 0:
        return 0.0
    groups = _FactorGroups(factors)
    num_factors = factors.shape[1]
    active_codes = codes[:, active_dims]
    active_variances = global_variances[active_dims]

    def votes(num_votes: int) -> np.ndarray:
        counts = np.zeros((num_factors, num_dims), dtype=np.int64)
        for start in range(0, num_votes, _BLOCK):
            size = min(_BLOCK, num_votes - start)
            fixed = rng.integers(num_factors, size=size)
            value = factors[rng.integers(num_images, size=size), fixed]
            batch = groups.sample(fixed, value, batch_size, rng)
            local_variances = active_codes[batch].var(axis=1, ddof=1)
            quietest = active_dims[np.argmin(local_variances / active_variances, axis=1)]
            np.add.at(counts, (fixed, quietest), 1)
        return counts

    classifier = np.argmax(votes(num_train), axis=0)  # each dimension's majority factor
    eval_votes = votes(num_eval)
    return float(eval_votes[classifier, np.arange(num_dims)].sum() / eval_votes.sum())


def _subset(num_images: int, num_points: int | None, rng: np.random.Generator, name: str) -> np.ndarray:
    """``num_points`` distinct images chosen by ``rng`` (all of them, in order, for None)."""
    if num_points is None:
        return np.arange(num_images)
    _check_positive(**{name: num_points})
    if num_points > num_images:
        raise ValueError(
            f"{name}={num_points} asks for more images than the set holds ({num_images}): lower it "
            "or encode more images."
        )
    return rng.permutation(num_images)[:num_points]


def mig(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    num_bins: int = 20,
    num_points: int | None = None,
    seed: int = 0,
) -> float:
    """Mutual Information Gap (Chen et al., NeurIPS 2018), with disentanglement_lib's estimator.

    Each code dimension is discretised into ``num_bins`` equal-width histogram bins; for each
    factor, the gap between the largest and second-largest mutual information with a code
    dimension is divided by the factor's entropy, and the gaps are averaged over factors.
    0 for a code independent of the factors; 1 when each factor is fully captured by a single
    dimension. On ``num_points`` images chosen by ``seed`` (disentanglement_lib: 10000), or on
    all of them (None), which involves no randomness.
    """
    codes, factors = _validate(codes, factors, min_dims=2)
    _check_positive(num_bins=num_bins)
    keep = _subset(len(codes), num_points, np.random.default_rng(seed), "num_points")
    return _mig(codes[keep], factors[keep], num_bins)


def _mig(codes: np.ndarray, factors: np.ndarray, num_bins: int) -> float:
    binned = [np.digitize(column, np.histogram_bin_edges(column, num_bins)[:-1]) for column in codes.T]
    gaps = []
    for factor in factors.T:
        entropy = mutual_info_score(factor, factor)
        if entropy == 0:
            raise ValueError("a factor takes a single value on the chosen images: use more images.")
        information = np.sort([mutual_info_score(factor, column) for column in binned])
        gaps.append((information[-1] - information[-2]) / entropy)
    return float(np.mean(gaps))


def _one_minus_normalised_entropy(weights: np.ndarray, axis: int) -> np.ndarray:
    """1 − entropy of ``weights`` normalised along ``axis``, in base (its length along axis)."""
    # The 1e-11 keeps all-zero importances finite, as in disentanglement_lib.
    probabilities = weights + 1e-11
    probabilities = probabilities / probabilities.sum(axis=axis, keepdims=True)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=axis)
    return 1.0 - entropy / np.log(weights.shape[axis])


def _fit_factor_classifier(
    codes: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    n_estimators: int,
    seed: int,
) -> tuple[np.ndarray, float]:
    """Gradient-boosted trees for one factor: (absolute feature importances, test accuracy)."""
    model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed)
    model.fit(codes[train], labels[train])
    return np.abs(model.feature_importances_), model.score(codes[test], labels[test])


def dci(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    num_train: int = 10000,
    num_test: int = 5000,
    n_estimators: int = 100,
    n_jobs: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """DCI (Eastwood & Williams, ICLR 2018) with gradient-boosted trees, as disentanglement_lib.

    One ``GradientBoostingClassifier(n_estimators)`` per factor predicts the factor from the
    code; the absolute feature importances form a d×K importance matrix R.
    ``disentanglement``: 1 − entropy (base K) of each dimension's row of R, weighted by the
    dimension's share of total importance (does each dimension explain one factor?).
    ``completeness``: 1 − entropy (base d) of each factor's column, weighted by the factor's
    share (is each factor explained by one dimension?). ``informativeness``: mean test accuracy
    of the classifiers (disentanglement_lib's ``informativeness_test``).

    ``num_train`` + ``num_test`` distinct images are chosen by ``seed`` (disentanglement_lib:
    10000 and 5000); the first ``num_train`` train the classifiers, the rest test them. Cost:
    gradient boosting fits n_estimators × (number of values) trees per factor, each factor on one
    core (``n_jobs`` factors at a time, joblib semantics: None = 1, -1 = all cores).
    """
    codes, factors = _validate(codes, factors, min_factors=2, min_dims=2)
    _check_positive(num_train=num_train, num_test=num_test, n_estimators=n_estimators)
    if num_train + num_test > len(codes):
        raise ValueError(
            f"dci needs num_train + num_test = {num_train + num_test} distinct images, the set holds "
            f"{len(codes)}: lower them or encode more images."
        )
    keep = np.random.default_rng(seed).permutation(len(codes))[: num_train + num_test]
    train, test = keep[:num_train], keep[num_train:]
    fits = Parallel(n_jobs=n_jobs)(
        delayed(_fit_factor_classifier)(codes, labels, train, test, n_estimators, seed)
        for labels in factors.T
    )
    importance = np.stack([feature_importance for feature_importance, _ in fits], axis=1)
    informativeness = float(np.mean([accuracy for _, accuracy in fits]))
    # With no importance at all, weight every dimension and factor alike (disentanglement_lib).
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    weights = weights / weights.sum()
    return {
        "disentanglement": float(
            (_one_minus_normalised_entropy(importance, axis=1) * weights.sum(axis=1)).sum()
        ),
        "completeness": float(
            (_one_minus_normalised_entropy(importance, axis=0) * weights.sum(axis=0)).sum()
        ),
        "informativeness": informativeness,
    }


def _one_draw(
    codes: np.ndarray, factors: np.ndarray, mig_images: np.ndarray, seed: int, sizes: dict[str, int]
) -> dict[str, float]:
    """One seeded draw of every score (MIG: on a bootstrap resample of `mig_images`)."""
    draw = {
        "beta_vae": beta_vae(
            codes, factors, num_train=sizes["beta_vae_train"], num_eval=sizes["beta_vae_eval"], seed=seed
        ),
        "factor_vae": factor_vae(
            codes, factors, num_train=sizes["factor_vae_train"], num_eval=sizes["factor_vae_eval"], seed=seed
        ),
    }
    resample = np.random.default_rng(seed).choice(mig_images, size=len(mig_images))
    draw["mig_bootstrap"] = _mig(codes[resample], factors[resample], 20)
    scores = dci(
        codes, factors, num_train=sizes["dci_train"], num_test=sizes["dci_test"],
        n_estimators=sizes["dci_estimators"], seed=seed,
    )
    draw.update({f"dci_{key}": value for key, value in scores.items()})
    return draw


def scores_with_errors(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    repeats: int = 5,
    seed: int = 0,
    beta_vae_train: int = 10000,
    beta_vae_eval: int = 5000,
    factor_vae_train: int = 10000,
    factor_vae_eval: int = 5000,
    mig_points: int | None = 10000,
    dci_train: int = 10000,
    dci_test: int = 5000,
    dci_estimators: int = 100,
    n_jobs: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """All four scores of one code, each with its standard error (``<score>_se``).

    β-VAE, FactorVAE and DCI are random estimates of a fixed quantity of the model (random
    image pairs, votes, train/test split and trees): each is drawn ``repeats`` times with seeds
    ``seed, seed+1, …``, the score is the mean of the draws and its error the standard error of
    that mean (std / √repeats). MIG involves no randomness once its images are chosen, so its
    error is a bootstrap one: the std of MIG over ``repeats`` resamples (with replacement) of
    its ``mig_points`` images. Neither covers a retrained model: a rerun that trains to other
    weights (another machine's floating point) moves the scores by more than these errors.
    Sample sizes default to disentanglement_lib's. The draws run ``n_jobs`` at a time (joblib
    semantics: None = 1, -1 = all cores); the results do not depend on it.
    """
    from tqdm import tqdm

    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to estimate a standard error, got {repeats}.")
    codes, factors = _validate(codes, factors, min_factors=2, min_dims=2)
    mig_images = _subset(len(codes), mig_points, np.random.default_rng(seed), "mig_points")
    sizes = {
        "beta_vae_train": beta_vae_train, "beta_vae_eval": beta_vae_eval,
        "factor_vae_train": factor_vae_train, "factor_vae_eval": factor_vae_eval,
        "dci_train": dci_train, "dci_test": dci_test, "dci_estimators": dci_estimators,
    }
    jobs = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_one_draw)(codes, factors, mig_images, seed + repeat, sizes) for repeat in range(repeats)
    )
    draws = list(tqdm(jobs, total=repeats, desc="disentanglement", unit="draw", disable=not progress))
    results: dict[str, float] = {}
    for key in draws[0]:
        values = [draw[key] for draw in draws]
        if key == "mig_bootstrap":
            results["mig"] = _mig(codes[mig_images], factors[mig_images], 20)
            results["mig_se"] = float(np.std(values, ddof=1))
        else:
            results[key] = float(np.mean(values))
            results[f"{key}_se"] = float(np.std(values, ddof=1) / np.sqrt(repeats))
    return results
