"""Micro experiments for the evaluate and sample stages: random LMDB splits and an untrained
checkpoint in the format training writes, so that no test here has to train a model first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sdn.config import ExperimentConfig, experiment_config
from sdn.data.lmdb_store import SplitMetadata, write_split
from sdn.params import load_params
from sdn.training.checkpoints import LAST_CHECKPOINT, config_fingerprint
from sdn.training.module import VAEModule
from tests.params_tools import detach, section_of, write_params_files
from tests.pipeline_project import micro_params

REPO = Path(__file__).resolve().parents[1]
# dataset, image size, factor sizes of the labels
DATASETS = {"photos32-cnn": ("photos32", 8, (3,)), "sprites-cnn": ("sprites", 64, (2, 3))}


def micro_project_params(name: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with experiment `name` at micro size on the CPU, `sections` overriding its
    subsections (e.g. sample={"temperatures": [0.5]})."""
    params = micro_params(load_params(REPO / "params.yaml"))
    dataset, size, _ = DATASETS[name]
    params["datasets"][dataset]["image_size"] = size
    params["trainer"].update(accelerator="cpu", progress_bar=False)
    detach(params, name)
    for section, values in sections.items():
        section_of(params, name, section).update(values)
    return params


def micro_experiment(name: str, **sections: dict[str, Any]) -> ExperimentConfig:
    return experiment_config(micro_project_params(name, **sections), name)


def write_params(root: Path, name: str, **sections: dict[str, Any]) -> None:
    params = micro_project_params(name, **sections)
    write_params_files(root, params, lambda data: yaml.safe_dump(data, sort_keys=False))


class EvaluationWorkdir:
    """data/lmdb/<dataset>/{train,val} of random images and data/checkpoints/<name>/last.ckpt."""

    def __init__(
        self, root: Path, cfg: ExperimentConfig, train_images: int = 48, val_images: int = 12
    ) -> None:
        self.root, self.cfg = root, cfg
        dataset, size, factor_sizes = DATASETS[cfg.name]
        self.lmdb = root / "data" / "lmdb" / dataset
        self.ckpt = root / "data" / "checkpoints" / cfg.name
        self.metrics = root / "metrics" / cfg.name
        rng = np.random.default_rng(0)
        for split, count in (("train", train_images), ("val", val_images)):
            images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
            labels = np.stack([np.arange(count) % n for n in factor_sizes], axis=1).astype(np.int64)
            names = tuple(f"factor{i}" for i in range(len(factor_sizes)))
            meta = SplitMetadata(dataset=dataset, split=split, count=0, shape=(3, size, size),
                                 label_names=names, label_sizes=factor_sizes)
            write_split(self.lmdb / split, [(images, labels)], meta)
        torch.manual_seed(0)
        module = VAEModule(cfg)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"state_dict": module.state_dict(), "sdn_fingerprint": config_fingerprint(cfg)},
            self.ckpt / LAST_CHECKPOINT,
        )
