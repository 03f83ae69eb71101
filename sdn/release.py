"""The authors' checkpoints: a checkpoint of the original release, read safely, as a `DensityVAE`.

The release trained with PyTorch Lightning 0.9, whose `ModelCheckpoint` files are pickles
(docs/modules.md#release-import): `state_dict` holds the raw weights under the release's module names and
the EMA weights under `ema.shadow_params.<name with '.' replaced by '^'>`; `hyper_parameters`
holds the training script's arguments. Among those, Lightning's own `--tpu_cores` (and `--gpus`
when not given) default to the function `Trainer._gpus_arg_default`, which protocol-2 pickles
name as `getattr(pytorch_lightning.trainer.trainer.Trainer, '_gpus_arg_default')`; with omegaconf
installed, Lightning 0.9 stores `hyper_parameters` as its `AttributeDict`. Those references are
read into inert stand-ins; every other global a pickle names is refused before anything is
built, so no code from a checkpoint ever runs.

Names map between the release and this project as follows (the release renamed its SDN layer's
parts once; both generations are read):

| release | here |
|---|---|
| `h` | `top` |
| `first_layer.0.`, `last_layer.2.`, `ladder_layers.` | `first_layer.`, `last_layer.`, `ladder.` |
| `post_model.arnn.conv_a.`, `conv_b.1.`, `conv_b.3.` | `posterior.ar_input.`, `ar_hidden.`, `ar_output.` |
| `sdn.pre_cnn.` or `sdn.project_in_stage.` | `sdn.project_in.` |
| `sdn.sdn_update_network.<i>.cell.gru.` or `sdn.sdn_correction_stage.<i>...` | `sdn.corrections.<i>.cell.` |
| `sdn.post_cnn.` or `sdn.project_out_stage.` | `sdn.project_out.` |
| `cnn.` (the residual SDN layer's convolution) | `conv.` |
| `obs_model.logscale` | `obs.log_scale` |
| `weight_g`, `weight_v` (weight-norm hook) | `parametrizations.weight.original0`, `.original1` |
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdn.atomic import atomic_write
from sdn.config import ExperimentConfig, TrainConfig, check_density
from sdn.errors import ConfigError, ReleaseCheckpointError, did_you_mean
from sdn.hyperparameters import DensityConfig
from sdn.models import prepare_model
from sdn.models.density import DensityVAE
from sdn.schema import build_section

# The release's `get_dataset_specifications`: (image_size, channels) of each density dataset.
RELEASE_DATASETS = {"CIFAR10": (32, 3), "ImageNet32": (32, 3), "CelebAHQ256": (256, 3)}
# The release's argparse names of the model's hyper-parameters; each is a DensityConfig field.
RELEASE_MODEL_ARGS = (
    "z_size", "h_size", "depth", "ds_list", "downsample_first", "sdn_max_scale", "sdn_min_scale",
    "sdn_nfeat_0", "sdn_nfeat_diff", "sdn_num_dirs", "post_model", "prior_model", "obs_model",
    "mix_components", "nbits", "free_bits",
)
EMA_PREFIX = "ema.shadow_params."
OLD_SDN_NAMES = (".sdn.pre_cnn.", ".sdn.sdn_update_network.", ".sdn.post_cnn.")


# --------------------------------------------------------------------------------------------
# Reading the pickle


class _Refused(Exception):
    """Raised inside the unpickler when a stand-in is used for anything but what the release wrote."""


class _LightningReference:
    """Stands in for an object of Lightning 0.9 that a checkpoint names but never needs."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(f"the pickle calls {self.name}, which a checkpoint of the release never does")

    def __repr__(self) -> str:
        return f"<Lightning 0.9 {self.name}, not loaded>"


class _AttributeDict(dict):
    """Lightning 0.9's `AttributeDict` (a dict with attribute access), read as a plain dict."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}  # torch's unpickler fills plain dicts only; __init__ is then not called


_TRAINER = _LightningReference("pytorch_lightning.trainer.trainer.Trainer")
_GPUS_ARG_DEFAULT = _LightningReference("pytorch_lightning.trainer.trainer.Trainer._gpus_arg_default")


def _trainer_attribute(owner: object, name: object) -> _LightningReference:
    """Stands in for `builtins.getattr`: resolves only `Trainer._gpus_arg_default`."""
    if owner is _TRAINER and name == "_gpus_arg_default":
        return _GPUS_ARG_DEFAULT
    raise _Refused(
        f"the pickle asks for getattr({owner!r}, {name!r}), which a checkpoint of the release never does"
    )


# Everything a checkpoint of the release's trainer names besides tensors and builtin containers.
_ADMITTED_GLOBALS = [
    (_trainer_attribute, "builtins.getattr"),
    (_TRAINER, _TRAINER.name),
    (_GPUS_ARG_DEFAULT, _GPUS_ARG_DEFAULT.name),
    (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
]


def read_release_file(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, unpickled with tensors and builtin containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no checkpoint to read there.")
    with path.open("rb") as handle:
        start = handle.read(4)
    if not (start.startswith(b"PK") or start.startswith(b"\x80")):  # torch's zip format, or a pickle
        raise ReleaseCheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {start!r}): is the download complete, "
            "and not a web page?"
        )
    try:
        with torch.serialization.safe_globals(_ADMITTED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _Refused as err:
        raise ReleaseCheckpointError(f"{path} is refused unread: {err} (nothing in it was run).") from None
    except pickle.UnpicklingError as err:
        raise ReleaseCheckpointError(
            f"{path} is refused unread: it refers to {_offending(str(err))}, which a checkpoint of the "
            "release's trainer never holds (nothing in it was run). Get the checkpoint from the authors' "
            "link."
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged or hostile pickle fails in many ways
        raise ReleaseCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]}): "
            "is the download complete, and not a web page?"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ReleaseCheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    missing = [key for key in ("state_dict", "hyper_parameters") if not isinstance(checkpoint.get(key), dict)]
    if missing:
        raise ReleaseCheckpointError(
            f"{path} is not a checkpoint of the release's trainer: it has no {' or '.join(missing)} dict."
        )
    return checkpoint


def _offending(message: str) -> str:
    """The global (or call) that torch's weights-only unpickler stopped at, from its message."""
    found = re.search(r"GLOBAL (\S+)", message)
    found = found or re.search(r"unrecognized function (.+?)(?:\.?\n|$)", message)
    if found:
        name = found.group(1)
        return name if "." in name else f"builtins.{name}"  # torch's message drops the module of builtins
    return re.sub(r"\s+", " ", message.split("WeightsUnpickler error:")[-1]).strip()[:200]


# --------------------------------------------------------------------------------------------
# Hyper-parameters


def release_model_config(hyper_parameters: Mapping[str, Any]) -> DensityConfig:
    """The DensityConfig of the model a checkpoint's `hyper_parameters` describe."""
    task = hyper_parameters.get("task", "density_estimation")
    if task != "density_estimation":
        raise ConfigError(f"hyper_parameters.task: {task!r}; only density_estimation checkpoints are read.")
    dataset = hyper_parameters.get("dataset")
    if dataset not in RELEASE_DATASETS:
        raise ConfigError(
            f"hyper_parameters.dataset: {dataset!r} is not a density dataset of the release."
            + did_you_mean(dataset, RELEASE_DATASETS)
        )
    missing = [name for name in RELEASE_MODEL_ARGS if name not in hyper_parameters]
    if missing:
        raise ConfigError(f"hyper_parameters lacks {', '.join(missing)}: the model cannot be built from it.")
    given = {name: hyper_parameters[name] for name in RELEASE_MODEL_ARGS}
    values = build_section(DensityConfig, given, "hyper_parameters", skip=("image_size", "channels"))
    image_size, channels = RELEASE_DATASETS[dataset]
    cfg = DensityConfig(image_size=image_size, channels=channels, **values)
    check_density(cfg, lambda key: f"hyper_parameters.{key}")
    if cfg.obs_model == "Bernoulli":
        # the release's Bernoulli scores [0, 1] intensities, this project's scores binarised pixels
        raise ConfigError("hyper_parameters.obs_model: the release's Bernoulli model is not supported.")
    ema_coef = hyper_parameters.get("ema_coef")
    if isinstance(ema_coef, bool) or not isinstance(ema_coef, int | float) or not 0 <= ema_coef <= 1:
        raise ConfigError(f"hyper_parameters.ema_coef: expected a number in [0, 1], got {ema_coef!r}.")
    return cfg


# --------------------------------------------------------------------------------------------
# Names


def _release_key(name: str, old_sdn_names: bool) -> str:
    """The release's state_dict key of this project's key `name`."""
    project_in, correction, project_out = (
        ("pre_cnn", "sdn_update_network", "post_cnn") if old_sdn_names
        else ("project_in_stage", "sdn_correction_stage", "project_out_stage")
    )
    rules = [
        (r"^top$", "h"),
        (r"^first_layer\.", "first_layer.0."),
        (r"^last_layer\.", "last_layer.2."),
        (r"^ladder\.", "ladder_layers."),
        (r"^obs\.log_scale$", "obs_model.logscale"),
        (r"\.posterior\.ar_input\.", ".post_model.arnn.conv_a."),
        (r"\.posterior\.ar_hidden\.", ".post_model.arnn.conv_b.1."),
        (r"\.posterior\.ar_output\.", ".post_model.arnn.conv_b.3."),
        (r"\.sdn\.project_in\.", f".sdn.{project_in}."),
        (r"\.sdn\.corrections\.(\d+)\.cell\.", rf".sdn.{correction}.\1.cell.gru."),
        (r"\.sdn\.project_out\.", f".sdn.{project_out}."),
        (r"\.conv\.", ".cnn."),
        (r"\.parametrizations\.weight\.original0$", ".weight_g"),
        (r"\.parametrizations\.weight\.original1$", ".weight_v"),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _ema_key(release_key: str) -> str:
    return EMA_PREFIX + release_key.replace(".", "^")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# --------------------------------------------------------------------------------------------
# Mapping the tensors


@dataclass
class ReleaseWeights:
    """A release checkpoint mapped onto this project's names (weight-normalised model)."""

    config: DensityConfig
    hyper_parameters: dict[str, Any]
    raw: dict[str, Tensor]  # the weights training ended with
    ema: dict[str, Tensor]  # the EMA weights the release evaluates and samples with
    uses_ema: bool  # False when ema_coef is 0: the release then evaluates the raw weights
    info: dict[str, Any]  # epoch, global_step, Lightning version


def build_release_model(cfg: DensityConfig) -> DensityVAE:
    """An untrained DensityVAE with the release's weight normalisation (names as in its checkpoints)."""
    return prepare_model(DensityVAE(cfg), TrainConfig(init="default", weight_norm=True))


def read_release_checkpoint(path: str | Path) -> ReleaseWeights:
    """Read, check and map every tensor of a release checkpoint (raw and EMA weights)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[ReleaseWeights, DensityVAE]:
    """The mapped weights, and the (untrained) model they were checked against."""
    checkpoint = read_release_file(path)
    hyper_parameters = checkpoint["hyper_parameters"]
    try:
        cfg = release_model_config(hyper_parameters)
    except ConfigError as err:
        raise ReleaseCheckpointError(f"{path}: {err}") from None
    state = checkpoint["state_dict"]
    model = build_release_model(cfg)
    ours = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    old_names = any(marker in key for key in state for marker in OLD_SDN_NAMES)

    expected: dict[str, tuple[str, str]] = {}  # release key -> (slot, our name)
    for name in ours:
        key = _release_key(name, old_names)
        expected[key] = ("raw", name)
        if name in parameters:
            expected[_ema_key(key)] = ("ema", name)
    unexpected = [key for key in state if key not in expected]
    missing = [key for key in expected if key not in state]
    if unexpected or missing:
        parts = [f"unexpected key(s) {_listed(unexpected)}"] if unexpected else []
        parts += [f"missing key(s) {_listed(missing)}"] if missing else []
        raise ReleaseCheckpointError(
            f"{path}: the state_dict does not match the model its hyper_parameters describe: "
            f"{'; '.join(parts)}."
        )

    mapped: dict[str, dict[str, Tensor]] = {"raw": {}, "ema": {}}
    for key, (slot, name) in expected.items():
        mapped[slot][name] = _checked_tensor(path, key, state[key], ours[name], name)
    for name in ours:
        if name not in parameters:  # buffers (the IAF masks) have no EMA slot: the model's own
            mapped["ema"][name] = mapped["raw"][name]
    info = {key: checkpoint.get(key) for key in ("epoch", "global_step", "pytorch-lightning_version")}
    weights = ReleaseWeights(
        config=cfg,
        hyper_parameters=hyper_parameters,
        raw=mapped["raw"],
        ema=mapped["ema"],
        uses_ema=hyper_parameters["ema_coef"] > 0,
        info=info,
    )
    return weights, model


def _checked_tensor(path: Path, key: str, value: Any, ours: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ReleaseCheckpointError(
            f"{path}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor."
        )
    if name.endswith(".mask"):
        # The release stores each masked conv's mask at the weight's full shape (out, in, k, k);
        # here it is one (k, k) pattern. They must hide the same positions.
        pattern_ok = value.dim() == 4 and value.shape[-2:] == ours.shape
        if not pattern_ok or not torch.equal(value, ours.expand_as(value)):
            raise ReleaseCheckpointError(
                f"{path}: state_dict[{key!r}] (shape {tuple(value.shape)}) is not the raster-order mask "
                f"{ours.int().tolist()} of {name}."
            )
        return ours.clone()
    same_shape = value.shape == ours.shape
    # the DL's global log-scale: shape (1,) in the release, a scalar here
    scalar = value.numel() == ours.numel() == 1 and name == "obs.log_scale"
    if not (same_shape or scalar):
        raise ReleaseCheckpointError(
            f"{path}: state_dict[{key!r}] has shape {tuple(value.shape)}, the model built from the "
            f"hyper_parameters needs {tuple(ours.shape)} for {name}."
        )
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise ReleaseCheckpointError(f"{path}: state_dict[{key!r}] holds non-finite or non-float values.")
    return value.detach().reshape(ours.shape).to(ours.dtype)


def load_release_checkpoint(path: str | Path) -> DensityVAE:
    """The release checkpoint at `path` as a DensityVAE with its EMA weights, in eval mode.

    The model is built from the checkpoint's own `hyper_parameters`; every tensor is checked by
    name and shape. No code from the file is run while reading it.
    """
    weights, model = _read(Path(path))
    model.load_state_dict(weights.ema if weights.uses_ema else weights.raw)
    return model.eval()


# --------------------------------------------------------------------------------------------
# The pipeline's import stage


def release_source(cfg: ExperimentConfig, raw_root: Path = Path("data/raw")) -> Path:
    """Where the authors' checkpoint of an experiment is placed by hand."""
    if cfg.release is None:
        raise ConfigError(
            f"experiments.{cfg.name} has no release section: its weights are trained here "
            f"(dvc repro train@{cfg.name})."
        )
    return raw_root / cfg.name / cfg.release.file


def import_release(cfg: ExperimentConfig, raw_root: Path, ckpt_dir: Path) -> Path:
    """Verify the hand-placed checkpoint, check it against `experiments.<name>.model`, and write
    `ckpt_dir/last.ckpt` in the form the evaluate and sample stages load (weights only)."""
    from sdn.data.download import fetch
    from sdn.errors import DownloadError
    from sdn.training.checkpoints import LAST_CHECKPOINT, config_fingerprint

    source = release_source(cfg, raw_root)
    release = cfg.release
    rerun = f"make {cfg.name}"
    if not source.is_file():
        # The link is a web page that serves the file only after a confirmation in a browser:
        # the file is fetched by hand, then verified here as any download is.
        raise DownloadError(
            f"the authors' checkpoint is not at {source}: download it from {release.url} and save it "
            f"as {source}, then rerun `{rerun}`."
        )
    fetch(release.url, source, "sha256", release.sha256, rerun=rerun,
          pin_key=f"experiments.{cfg.name}.release.sha256")
    if not cfg.train.weight_norm:
        raise ConfigError(
            f"experiments.{cfg.name}.train.weight_norm: must be true, the release's weights are "
            "weight-normalised."
        )
    target = ckpt_dir / LAST_CHECKPOINT
    fingerprint = config_fingerprint(cfg)
    if _is_current(target, fingerprint, release.sha256):
        print(f"[sdn] {target} already holds {source} for this configuration.")
        return target

    weights = read_release_checkpoint(source)
    found, wanted = weights.config, cfg.model
    differences = [
        f"model.{f.name}: {getattr(found, f.name)!r} (params.yaml has {getattr(wanted, f.name)!r})"
        for f in fields(DensityConfig)
        if getattr(found, f.name) != getattr(wanted, f.name)
    ]
    if differences:
        raise ConfigError(
            f"experiments.{cfg.name}: the checkpoint {source} holds another model; set "
            f"{'; '.join(differences)} in params.yaml and rerun `{rerun}`."
        )
    ema = weights.ema if weights.uses_ema else weights.raw
    checkpoint = {
        "state_dict": {**{f"model.{k}": v for k, v in weights.raw.items()},
                       **{f"ema.{k}": v for k, v in ema.items()}},
        "sdn_fingerprint": fingerprint,
        "sdn_experiment": cfg.name,
        "sdn_release": {"url": release.url, "sha256": release.sha256, "file": release.file, **weights.info},
    }
    atomic_write(target, lambda tmp: torch.save(checkpoint, tmp))
    print(f"[sdn] {cfg.name}: imported {source} (epoch {weights.info['epoch']}, step "
          f"{weights.info['global_step']}, {'EMA' if weights.uses_ema else 'raw'} weights) into {target}")
    return target


def _is_current(target: Path, fingerprint: str, sha256: str | None) -> bool:
    """Whether `target` was written from the pinned file for this configuration."""
    if not target.is_file():
        return False
    try:
        written = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable output is simply rewritten
        return False
    source = written.get("sdn_release", {}) if isinstance(written, dict) else {}
    return written.get("sdn_fingerprint") == fingerprint and source.get("sha256") == sha256
