"""The experiments of `params.yaml` and `paper.yaml` (read by `sdn.params`), validated and
assembled: each experiment over its base, with the global trainer defaults.

Every section is checked against a dataclass before any work starts (`sdn.schema`): unknown
(misspelt) keys, wrong types and impossible values stop with a `ConfigError` naming the dotted key
and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdn.errors import ConfigError, did_you_mean
from sdn.hyperparameters import (
    MODEL_KINDS,
    OBSERVATIONS,
    POSTERIORS,
    PRIORS,
    DensityConfig,
    DisentanglementConfig,
    ladder_scales,
    uses_sdn,
)
from sdn.params import NAMED_SECTIONS, PAPER_FILE, dataset_config
from sdn.schema import (
    AT_LEAST_1,
    CHOICE,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    build_section,
    missing_key,
    ranged,
    reject_unknown,
    required,
)

INITS = ("orthogonal", "default")
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true")


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; an experiment's `trainer:` overrides these keys."""

    accelerator: str = "auto"
    devices: int | str = ranged(1, AT_LEAST_1)  # or a string such as "auto"
    num_nodes: int = ranged(1, AT_LEAST_1)
    strategy: str = "auto"
    precision: int | str = ranged("32-true", CHOICE)  # one of PRECISIONS
    num_workers: int = ranged(0, Range(0, 256))
    deterministic: bool = True
    log_every_n_steps: int = ranged(10, AT_LEAST_1)
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """Optimisation. The defaults are the release's density regime; its β-VAE regime is
    `weight_norm: false`, `ema_coef: null`, `lrate_decay: 1.0` (and `precision: 32-true`)."""

    batch_size: int = ranged(32, AT_LEAST_1)
    max_steps: int = ranged(1000, AT_LEAST_1)
    lr: float = ranged(0.002, POSITIVE)
    # ExponentialLR factor per epoch; 1.0 keeps the rate constant
    lrate_decay: float = ranged(1.0, Range(0, 1, low_open=True))
    # null: no EMA (the β-VAE regime); validation, evaluation and sampling then use the raw weights
    ema_coef: float | None = ranged(0.999, Range(0, 1, high_open=True))
    accumulate_grad_batches: int = ranged(1, AT_LEAST_1)
    gradient_clip_val: float | None = ranged(None, POSITIVE)  # null: no clipping
    val_every_steps: int = ranged(500, AT_LEAST_1)
    val_batches: int | None = ranged(None, NON_NEGATIVE)  # null: the whole split; 0: no validation
    ckpt_every_steps: int = ranged(500, AT_LEAST_1)
    # "orthogonal": the release's init (conv weights orthogonal, Linear weights N(0, 0.02), biases
    # keep PyTorch's init); "default": PyTorch's init throughout.
    init: str = "orthogonal"
    weight_norm: bool = True  # g and v per output channel of every conv, as released


@dataclass
class EvaluateConfig:
    iw_samples: int = ranged(1024, AT_LEAST_1)
    batch_size: int = ranged(32, AT_LEAST_1)
    chunk_size: int = ranged(1024, AT_LEAST_1)
    max_images: int | None = ranged(None, AT_LEAST_1)  # null: the whole split
    # Disentanglement (β-VAEs): labelled training images encoded (null: all), the metrics'
    # repeated draws for standard errors (a standard error needs two), and their sample sizes
    # (defaults: disentanglement_lib's).
    disentanglement_points: int | None = ranged(None, Range(2))
    disentanglement_repeats: int = ranged(5, Range(2))
    beta_vae_train: int = ranged(10000, AT_LEAST_1)
    beta_vae_eval: int = ranged(5000, AT_LEAST_1)
    factor_vae_train: int = ranged(10000, AT_LEAST_1)
    factor_vae_eval: int = ranged(5000, AT_LEAST_1)
    mig_points: int | None = ranged(10000, Range(2))  # null: every encoded image
    dci_train: int = ranged(10000, AT_LEAST_1)
    dci_test: int = ranged(5000, AT_LEAST_1)


@dataclass
class SampleConfig:
    temperatures: list[float] = ranged(allowed=NON_NEGATIVE, factory=lambda: [1.0, 0.9, 0.8, 0.7])
    grid: int = ranged(8, Range(1, 64))
    # as released: with il here, the latents of ladder layers 0..il from the top are interpolated
    interpolation_layers: list[int] = ranged(allowed=NON_NEGATIVE, factory=lambda: [2])
    interpolation_steps: int = ranged(6, AT_LEAST_1)
    interpolation_temperature: float = ranged(0.0, NON_NEGATIVE)
    neighbourhood_layers: int = ranged(2, NON_NEGATIVE)
    neighbourhood_temperature: float = ranged(0.7, NON_NEGATIVE)
    nearest_samples: int = ranged(4, AT_LEAST_1)
    nearest_k: int = ranged(5, AT_LEAST_1)


@dataclass
class ReleaseConfig:
    """Where an experiment's weights come from when they are the authors' published checkpoint
    (placed by hand at data/raw/<experiment>/<file>, verified against `sha256`)."""

    url: str
    sha256: str | None  # empty (null) until the file is first placed
    file: str


@dataclass
class ExperimentConfig:
    name: str
    base: str  # the entry of `bases:` it extends
    dataset: str
    seed: int
    model: DensityConfig | DisentanglementConfig
    kind: str
    trainer: TrainerConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    sample: SampleConfig
    reported: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    flip: bool = False  # random horizontal flips of training images, from datasets.<name>.flip
    release: ReleaseConfig | None = None  # weights imported from the authors' checkpoint, not trained
    # enabled only by name (`make showcase`, `sdn pipeline enable <name>`), never with its dataset
    opt_in: bool = False


# The keys of params.yaml, of a base and of an experiment. A base holds what the runs extending it
# share, the evaluation and sampling protocol included; an experiment, its own model, training
# and trainer keys (each overriding the base's key by key) and what only it has.
SECTIONS = ("datasets", "trainer", "bases", "experiments")
BASE_KEYS = ("dataset", "seed", "model", "train", "evaluate", "sample")
EXPERIMENT_KEYS = ("extends", "baseline", "opt_in", "reported", "release", "model", "train", "trainer")
OVERRIDDEN = ("model", "train")  # sections an experiment merges into its base's


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"unknown value {value!r}; expected one of {', '.join(choices)}.")


def check_density(cfg: DensityConfig, at: Callable[[str], str]) -> None:
    """Raise a ConfigError unless a density model's hyper-parameters fit together: its choices
    known, `ds_list` inside the ladder, SDN layers with features and directions, and every
    downsampled map even. `at(key)`: the dotted key an error names."""
    _choice(cfg.post_model, POSTERIORS, at("post_model"))
    _choice(cfg.prior_model, PRIORS, at("prior_model"))
    _choice(cfg.obs_model, OBSERVATIONS, at("obs_model"))
    # single values are in range (each field's metadata): what is left are checks across keys
    bad = [i for i in cfg.ds_list if not 0 <= i < cfg.depth]
    _require(not bad, at("ds_list"), f"layer indices {bad} lie outside 0..depth-1 (depth={cfg.depth}).")
    _require(len(set(cfg.ds_list)) == len(cfg.ds_list), at("ds_list"), "contains repeated layers.")
    if uses_sdn(cfg):
        _require(cfg.sdn_nfeat_0 >= 1, at("sdn_nfeat_0"), "SDN layers need at least 1 feature.")
        _require(cfg.sdn_num_dirs >= 1, at("sdn_num_dirs"), "SDN layers need at least 1 direction.")
    # downsampling an odd map would not invert on the way down
    if cfg.downsample_first:
        _require(cfg.image_size % 2 == 0, at("downsample_first"), "needs an even image size.")
    for i, (scale, downsample) in enumerate(ladder_scales(cfg)[0]):
        _require(
            not downsample or scale % 2 == 0,
            at("ds_list"), f"layer {i} would downsample an odd {scale}x{scale} map.",
        )



def _check_disentanglement(cfg: DisentanglementConfig, at: Callable[[str], str]) -> None:
    _choice(cfg.obs_model, OBSERVATIONS, at("obs_model"))
    _require(cfg.image_size == 64, at("image_size"), "the β-VAE is built for 64x64 images.")
    if uses_sdn(cfg):
        _require(cfg.sdn_nfeat_0 >= 1, at("sdn_nfeat_0"), "SDN layers need at least 1 feature.")
        _require(cfg.sdn_num_dirs >= 1, at("sdn_num_dirs"), "SDN layers need at least 1 direction.")


def _check_disentanglement_sizes(ev: EvaluateConfig, where: str) -> None:
    # single values are in range (each field's metadata): what is left is whether the samples fit
    # the encoded pool
    pool = ev.disentanglement_points
    if pool is not None:
        _require(
            ev.dci_train + ev.dci_test <= pool, f"{where}.dci_train",
            f"dci_train + dci_test = {ev.dci_train + ev.dci_test} exceeds the {pool} encoded images "
            "(disentanglement_points): lower them or raise disentanglement_points.",
        )
        _require(
            ev.mig_points is None or ev.mig_points <= pool, f"{where}.mig_points",
            f"{ev.mig_points} exceeds the {pool} encoded images (disentanglement_points).",
        )


def _dataset_shape(params: dict[str, Any], dataset: str, where: str) -> tuple[int, int, bool]:
    cfg = dataset_config(params, dataset)
    if not isinstance(cfg, dict):
        raise ConfigError(f"datasets.{dataset}: expected a mapping (used by {where}).")
    for key in ("image_size", "channels"):
        value = cfg.get(key)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"datasets.{dataset}.{key}",
            f"expected a positive integer, got {value!r} (used by {where}).",
        )
    flip = cfg.get("flip", False)
    _require(isinstance(flip, bool), f"datasets.{dataset}.flip", f"expected true or false, got {flip!r}.")
    return cfg["image_size"], cfg["channels"], flip


def _model_section(
    base: Any, run: Any, where: tuple[str, str], image_size: int, channels: int
) -> tuple[str, DensityConfig | DisentanglementConfig]:
    """The model's kind and its checked hyper-parameters: the base's `model:` with the experiment's
    keys over it (`where`: the two sections' dotted keys). Image size and channels come from the
    dataset."""
    for raw, key in zip((base, run), where, strict=True):
        _require(isinstance(raw, dict | None), key, "expected a mapping of hyper-parameters.")
    kind = {**(base or {}), **(run or {})}.get("kind")
    kind_key = f"{where[1] if 'kind' in (run or {}) else where[0]}.kind"
    _require(kind in MODEL_KINDS, kind_key, f"expected one of {', '.join(MODEL_KINDS)}, got {kind!r}.")
    model_cls = DensityConfig if kind == "density" else DisentanglementConfig
    values = _merged_section(model_cls, base, run, where, skip=("image_size", "channels", "kind"))
    model = model_cls(image_size=image_size, channels=channels, **values)
    at = _setter(base, run, where)
    if kind == "density":
        check_density(model, at)
    else:
        _check_disentanglement(model, at)
    return kind, model


def _setter(base: Any, run: Any, where: tuple[str, str]) -> Callable[[str], str]:
    """The dotted key of a section's field where it is set: the experiment's own section, else its
    base's (where a default applies, the experiment's)."""
    return lambda key: f"{where[0] if key in (base or {}) and key not in (run or {}) else where[1]}.{key}"


def _merged_section(
    cls: type, base: Any, run: Any, where: tuple[str, str], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A section's values: the base's, then the experiment's over them key by key, each checked
    under its own dotted key (`where`: the base's and the experiment's section)."""
    values = build_section(cls, base, where[0], skip=skip, partial=True)
    values.update(build_section(cls, run, where[1], skip=skip, partial=True))
    missing = [f for f in dataclasses.fields(cls)
               if f.name not in skip and f.name not in values and required(f)]
    if missing:
        raise missing_key(f"{where[0]}.{missing[0].name}", typing.get_type_hints(cls)[missing[0].name])
    return values


def _sample_section(raw: Any, where: str, model: DensityConfig | DisentanglementConfig) -> SampleConfig:
    """The checked `sample:` section; for a ladder, its layer counts must fit the model's depth."""
    sample = SampleConfig(**build_section(SampleConfig, raw, where))
    _require(bool(sample.temperatures), f"{where}.temperatures", "give at least one temperature.")
    if isinstance(model, DensityConfig):
        _require(
            all(n < model.depth for n in sample.interpolation_layers),
            f"{where}.interpolation_layers",
            f"each is the index (from the top) of the last interpolated ladder layer: at most "
            f"model.depth-1={model.depth - 1}, got {sample.interpolation_layers!r}.",
        )
        _require(
            sample.neighbourhood_layers <= model.depth,
            f"{where}.neighbourhood_layers",
            f"counts ladder layers: at most model.depth={model.depth}, got {sample.neighbourhood_layers!r}.",
        )
    return sample


def _reported_section(raw: Any, where: str) -> dict[str, float]:
    """The paper's figures (`reported:`): metric name to a non-negative number."""
    reported = raw or {}
    _require(isinstance(reported, dict), where, "expected a mapping of metric name to number.")
    for metric, value in reported.items():
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where}.{metric}",
            f"expected a number, got {value!r}.",
        )
        NON_NEGATIVE.check(value, f"{where}.{metric}")
    return reported


def _entry(params: dict[str, Any], section: str, name: str, what: str) -> dict[str, Any]:
    entries = params.get(section) or {}
    if name not in entries:
        hint = did_you_mean(name, sorted(entries))
        raise ConfigError(f"{section}.{name}: no such {what} in params.yaml or {PAPER_FILE}.{hint}")
    _require(isinstance(entries[name], dict), f"{section}.{name}", "expected a mapping.")
    return entries[name]


def experiment_config(params: dict[str, Any], name: str) -> ExperimentConfig:
    """Validate and assemble `experiments.<name>`: its base (`extends`) with the experiment's own
    keys over it, and the global `trainer:` defaults."""
    raw = _entry(params, "experiments", name, "experiment")
    where = f"experiments.{name}"
    for key in ("evaluate", "sample", "dataset", "seed"):
        _require(
            key not in raw, f"{where}.{key}",
            f"set in the experiment's base (bases.<base>.{key}), which every run extending it shares.",
        )
    reject_unknown(raw, EXPERIMENT_KEYS, where)
    _require("extends" in raw, f"{where}.extends", "missing: name the base (in `bases:`) it extends.")
    base_name = raw["extends"]
    _require(isinstance(base_name, str), f"{where}.extends", f"expected a base's name, got {base_name!r}.")
    base = _entry(params, "bases", base_name, "base")
    at = f"bases.{base_name}"
    reject_unknown(base, BASE_KEYS, at)
    for key in BASE_KEYS:
        _require(key in base, f"{at}.{key}", "missing; it is required in every base (`{}`: empty section).")
    dataset = base["dataset"]
    _require(isinstance(dataset, str), f"{at}.dataset", "expected a dataset name.")
    seed = base["seed"]
    _require(isinstance(seed, int) and not isinstance(seed, bool), f"{at}.seed", "expected an integer.")
    SEED.check(base["seed"], f"{at}.seed")
    image_size, channels, flip = _dataset_shape(params, dataset, where)
    sections = {key: (f"{at}.{key}", f"{where}.{key}") for key in OVERRIDDEN}

    kind, model = _model_section(base["model"], raw.get("model"), sections["model"], image_size, channels)

    trainer_values = build_section(TrainerConfig, params.get("trainer"), "trainer")
    trainer_values.update(build_section(TrainerConfig, raw.get("trainer"), f"{where}.trainer"))
    trainer = TrainerConfig(**trainer_values)
    own_trainer = raw.get("trainer") or {}
    _choice(str(trainer.precision), PRECISIONS,
            f"{where}.trainer.precision" if "precision" in own_trainer else "trainer.precision")

    train = TrainConfig(**_merged_section(TrainConfig, base["train"], raw.get("train"), sections["train"]))
    _choice(train.init, INITS, _setter(base["train"], raw.get("train"), sections["train"])("init"))

    evaluate = EvaluateConfig(**build_section(EvaluateConfig, base["evaluate"], f"{at}.evaluate"))
    _check_disentanglement_sizes(evaluate, f"{at}.evaluate")
    sample = _sample_section(base["sample"], f"{at}.sample", model)
    reported = _reported_section(raw.get("reported"), f"{where}.reported")
    baseline = raw.get("baseline")
    if baseline is not None:
        experiments = params.get("experiments") or {}
        _require(baseline in experiments, f"{where}.baseline", f"no experiment named {baseline!r}.")
    release = _release_config(raw.get("release"), kind, f"{where}.release")
    opt_in = raw.get("opt_in", False)
    _require(isinstance(opt_in, bool), f"{where}.opt_in", f"expected true or false, got {opt_in!r}.")
    return ExperimentConfig(
        name=name,
        base=base_name,
        dataset=dataset,
        seed=seed,
        model=model,
        kind=kind,
        trainer=trainer,
        train=train,
        evaluate=evaluate,
        sample=sample,
        reported=reported,
        baseline=baseline,
        flip=flip,
        release=release,
        opt_in=opt_in,
    )


def _release_config(raw: Any, kind: str, where: str) -> ReleaseConfig | None:
    if raw is None:
        return None
    release = ReleaseConfig(**build_section(ReleaseConfig, raw, where))
    _require(kind == "density", where, "the authors published density (SDN-VAE) checkpoints only.")
    _require(
        release.sha256 is None or re.fullmatch("[0-9a-fA-F]{64}", release.sha256) is not None,
        f"{where}.sha256", "must be 64 hex digits, or null until the file is first placed.",
    )
    _require(
        release.file not in ("", ".", "..") and "/" not in release.file and "\\" not in release.file,
        f"{where}.file",
        f"must be a bare file name (it is placed in data/raw/<experiment>/), got {release.file!r}.",
    )
    return release


def validate_params(params: dict[str, Any]) -> list[ExperimentConfig]:
    """Check the trainer defaults and every experiment; returns the experiments. Each dataset's own
    settings (URLs, checksums, generation knobs) are checked by `sdn.data.sources.validate_datasets`,
    which the data stages run: the stages downstream of the data read only a dataset's shape and
    flips (checked here), and so neither import nor depend on the data sources."""
    for key in params:
        if key not in SECTIONS:
            hint = did_you_mean(key, SECTIONS)
            raise ConfigError(f"{key}: unknown top-level section in params.yaml.{hint}")
    for section in NAMED_SECTIONS:
        _require(isinstance(params.get(section) or {}, dict), section, "expected a mapping of names.")
    build_section(TrainerConfig, params.get("trainer"), "trainer")
    experiments = [experiment_config(params, name) for name in params.get("experiments") or {}]
    extended = {cfg.base for cfg in experiments}
    for name in params.get("bases") or {}:
        _require(name in extended, f"bases.{name}", "no experiment extends it: remove it, or add one.")
    return experiments

