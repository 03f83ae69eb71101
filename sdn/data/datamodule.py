"""The one way training, evaluation and sampling get their data: checked LMDB splits, the order
training deals them in, and its random flips.

Batches are indexed by optimizer step, not by epoch position (`StepBatchSampler`): the data a
step sees depends only on the seed and the step, so a run killed and resumed from a checkpoint,
a run split across DDP processes, and a run with gradient accumulation all see the same images
as one uninterrupted process with the same global batch. Evaluation deals every image exactly
once, in the same batches on any number of processes (`ShardSampler`).

Flips are drawn on the images' device inside the training step, after it has seeded its
generator by the micro-batch's place in the run (`random_flips`): a loader cannot know that
place, and drawn there the flips do not depend on the number of loader workers either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from sdn.data.lmdb_store import LMDBImageDataset, SplitMetadata, convert_hint, open_split
from sdn.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from sdn.config import ExperimentConfig

SPLITS = ("train", "val")


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches for micro-steps `start, start+1, …, total-1`.

    Micro-step m belongs to epoch e = m // per_epoch, whose order is a permutation seeded by
    (seed, e); the global batch of m is split between processes by rank. An epoch holds whole
    optimizer steps of `accumulate` micro-steps, so k processes, k accumulated micro-batches and
    one k-times larger batch all cut the same images into the same optimizer steps.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, total: int, rank: int = 0, world: int = 1,
        accumulate: int = 1,
    ) -> None:
        if size < batch_size * world * accumulate:
            raise ConfigError(
                f"The training split has {size} images, fewer than one global batch "
                f"({batch_size} x {world} processes x {accumulate} accumulated): lower train.batch_size."
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.total, self.rank, self.world = total, rank, world
        self.start = 0
        self.global_batch = batch_size * world
        self.per_epoch = size // (self.global_batch * accumulate) * accumulate

    def _order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = None, None
        for step in range(self.start, self.total):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self._order(epoch)
            first = (step % self.per_epoch) * self.global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        # The whole run: on resume Lightning restores its batch index to `start` and ends the
        # epoch at this length, so `total - start` would end it early and repeat batches.
        return self.total


class ShardSampler(Sampler[int]):
    """Evaluation order: the images cut into batches of `batch_size` and process r takes batches
    r, r+world, … — every image exactly once, and each batch holds the same images whatever the
    number of processes."""

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, limit: int | None = None, batch_size: int = 1
    ) -> None:
        count = size if limit is None else min(size, limit)
        starts = range(rank * batch_size, count, world * batch_size)
        self.indices = [i for start in starts for i in range(start, min(start + batch_size, count))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def random_flips(images: Tensor) -> Tensor:
    """Each image of a (B, C, H, W) batch mirrored horizontally with probability 1/2, drawn from
    the global generator of the images' device: the caller seeds it (training seeds each
    micro-batch by its place in the run, see `VAEModule`)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class ImageDataModule(pl.LightningDataModule):
    """Train and validation batches `(images, labels)` of a dataset converted by `stages/convert.py`.

    Images are uint8 (B, C, H, W) unless `transform` (applied to each uint8 image) changes
    them; labels are int64 (B, K), K = 0 for datasets without labels. Training batches follow
    `StepBatchSampler` for `steps` optimizer steps of `accumulate` micro-batches (by default one
    pass over the split), from `start_step` on; validation batches of `val_batch_size` follow
    `ShardSampler`, over the first `val_limit` images (all by default). Under a Trainer each
    process takes its own share. The splits in `splits` are opened and checked now (the others
    when first asked for): they must be converted for `dataset` (by default the folder's name, as
    in `data/lmdb/<dataset>`), train and val must agree, and `image_shape`, if given, is what
    `expected_by` (e.g. `experiments.<name>`) needs (C, H, W). Horizontal flips, for datasets
    that use them, are drawn in the training step (`random_flips`).
    """

    def __init__(
        self,
        data_dir: Path | str,
        batch_size: int,
        num_workers: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        image_shape: tuple[int, int, int] | None = None,
        pin_memory: bool = False,
        dataset: str | None = None,
        *,
        expected_by: str = "this run",
        steps: int | None = None,
        accumulate: int = 1,
        start_step: int = 0,
        val_batch_size: int | None = None,
        val_limit: int | None = None,
        splits: tuple[str, ...] = SPLITS,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.dataset_name = dataset or self.data_dir.name
        self.batch_size, self.num_workers = batch_size, num_workers
        self.transform, self.seed, self.pin_memory = transform, seed, pin_memory
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.expected_by = expected_by
        self.steps, self.accumulate, self.start_step = steps, accumulate, start_step
        self.val_batch_size = val_batch_size or batch_size
        self.val_limit = val_limit
        self._datasets: dict[str, LMDBImageDataset] = {}
        for split in splits:  # opened (and checked) now, to fail early, before training
            self.dataset(split)

    @classmethod
    def for_experiment(
        cls, cfg: ExperimentConfig, lmdb_dir: Path | str, splits: tuple[str, ...] = SPLITS,
        pin_memory: bool = False,
    ) -> ImageDataModule:
        """The data of experiment `cfg`, as its training reads them, from `lmdb_dir`
        (`data/lmdb/<dataset>`). `train.val_batches` counts batches of the whole validation, not
        of each process: every run of an experiment, on any number of processes, validates on the
        same images, each exactly once. `pin_memory`: batches in page-locked memory, for a copy
        to a GPU that overlaps the computation."""
        train = cfg.train
        val_batch = cfg.evaluate.batch_size
        return cls(
            lmdb_dir,
            train.batch_size,
            cfg.trainer.num_workers,
            seed=cfg.seed,
            image_shape=(cfg.model.channels, cfg.model.image_size, cfg.model.image_size),
            dataset=cfg.dataset,
            expected_by=f"experiments.{cfg.name}",
            steps=train.max_steps,
            accumulate=train.accumulate_grad_batches,
            val_batch_size=val_batch,
            val_limit=None if train.val_batches is None else train.val_batches * val_batch,
            splits=splits,
            pin_memory=pin_memory,
        )

    def dataset(self, split: str) -> LMDBImageDataset:
        """The `train` or `val` split as a Dataset, checked when first opened."""
        if split not in self._datasets:
            data = open_split(self.data_dir, split, self.dataset_name, transform=self.transform)
            self._check(data.meta)
            self._datasets[split] = data
        return self._datasets[split]

    def _check(self, meta: SplitMetadata) -> None:
        found = meta.shape
        if self.image_shape is not None and found != self.image_shape:
            raise DatasetError(
                f"{meta.dataset}/{meta.split} holds images of shape {found} but {self.expected_by} expects "
                f"{self.image_shape} (from datasets.{meta.dataset}.image_size/channels): fix params.yaml or "
                f"re-run dvc repro convert@{meta.dataset}."
            )
        for other in self._datasets.values():
            seen = other.meta
            if (seen.shape, seen.label_names) != (found, meta.label_names):
                raise DatasetError(
                    f"{self.data_dir}: {seen.split} and {meta.split} disagree (shapes {seen.shape} / "
                    f"{found}, labels {seen.label_names} / {meta.label_names}); rebuild it with "
                    f"{convert_hint(self.data_dir / meta.split)}."
                )

    @property
    def metadata(self) -> dict[str, Any]:
        """Shape, labels (names, sizes, value names) and the count of each split."""
        metas = {split: self.dataset(split).meta for split in SPLITS}
        train = metas["train"]
        return {
            "dataset": train.dataset,
            "shape": list(train.shape),
            "dtype": "uint8",
            "label_names": list(train.label_names),
            "label_sizes": list(train.label_sizes),
            "label_values": train.label_values,
            "counts": {split: meta.count for split, meta in metas.items()},
        }

    def _process(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def train_sampler(self, rank: int = 0, world: int = 1) -> StepBatchSampler:
        """Process `rank`'s micro-batches of the run, from `start_step` on."""
        size = len(self.dataset("train"))
        per_step = self.batch_size * world * self.accumulate
        steps = self.steps if self.steps is not None else max(1, size // per_step)
        sampler = StepBatchSampler(
            size, self.batch_size, self.seed, total=steps * self.accumulate, rank=rank, world=world,
            accumulate=self.accumulate,
        )
        sampler.start = self.start_step * self.accumulate
        return sampler

    def steps_per_epoch(self, world: int = 1) -> int:
        """Optimizer steps in one pass over the training split (what the per-epoch LR decay counts)."""
        return self.train_sampler(0, world).per_epoch // self.accumulate

    def train_dataloader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset("train"), batch_sampler=self.train_sampler(*self._process()), num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self.pin_memory,
        )

    def shard_loader(
        self, split: str, batch_size: int, limit: int | None = None, num_workers: int = 0
    ) -> DataLoader:
        """Every image of `split` (or the first `limit`) once, in batches of `batch_size`: this
        process's share under a Trainer, all of them outside one."""
        data = self.dataset(split)
        rank, world = self._process()
        return DataLoader(
            data, batch_size=batch_size, num_workers=num_workers, pin_memory=self.pin_memory,
            sampler=ShardSampler(len(data), rank, world, limit=limit, batch_size=batch_size),
        )

    def val_dataloader(self) -> DataLoader:
        return self.shard_loader("val", self.val_batch_size, self.val_limit, self.num_workers)
