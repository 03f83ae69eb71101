"""GLOW's TFRecord tars (imagenet32, celebahq256): the shards of one resolution, read with
`sdn.data.tfrecord` (no TensorFlow)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np

from sdn.data.source import Batches, DatasetContent, RemoteSource, SplitSource
from sdn.data.tfrecord import parse_example, read_records
from sdn.errors import DatasetError


class GlowSource(RemoteSource):
    """GLOW's TFRecord tars (imagenet-oord, celeba): records of 'shape', 'data' (HWC bytes), 'label'.

    Shards are named `<split>/<split>-r<log2 resolution>-s-<index>-of-<total>.tfrecords`; the
    tar may hold several resolutions (ImageNet: 32 and 64) and prefixes (`mnt/host/...`).
    """

    _SHARD = re.compile(r"(?:^|/)(train|validation)/\1-r(\d+)-s-(\d+)-of-(\d+)\.tfrecords$")
    _SPLITS = {"train": "train", "val": "validation"}

    def check(self) -> None:
        super().check()
        size = self.cfg["image_size"]
        self.require(size & (size - 1) == 0, "image_size", "GLOW stores powers of two only")

    def read(self, raw_dir: Path) -> DatasetContent:
        archive = self.archive(raw_dir)
        level = self.cfg["image_size"].bit_length() - 1
        shards: dict[str, list[tuple[int, str]]] = {split: [] for split in self._SPLITS.values()}
        totals: dict[str, set[int]] = {split: set() for split in self._SPLITS.values()}
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                match = self._SHARD.search(member.name)
                if match and member.isfile() and int(match.group(2)) == level:
                    shards[match.group(1)].append((int(match.group(3)), member.name))
                    totals[match.group(1)].add(int(match.group(4)))
        for split, found in shards.items():
            expected = totals[split].pop() if len(totals[split]) == 1 else None
            if expected is None or sorted(i for i, _ in found) != list(range(expected)):
                raise DatasetError(
                    f"{archive} does not hold the complete {split} split at resolution {2**level} "
                    f"(r{level:02d}): found {len(found)} shard(s) of {sorted(totals[split]) or '?'}. "
                    "The archive is incomplete or not GLOW's: delete it and rerun "
                    f"`python stages/download.py {self.name}`."
                )

        def batches(split: str) -> Batches:
            with tarfile.open(archive) as tar:
                for _, member in sorted(shards[split]):
                    with tar.extractfile(member) as handle:
                        records = read_records(handle.read(), f"{archive}:{member}")
                    yield self._images(records, f"{archive}:{member}"), np.zeros((len(records), 0), np.int64)

        return DatasetContent(
            splits={ours: SplitSource(lambda s=theirs: batches(s)) for ours, theirs in self._SPLITS.items()}
        )

    def _images(self, records: list[bytes], where: str) -> np.ndarray:
        channels, height, width = self.shape
        images = np.empty((len(records), height, width, channels), dtype=np.uint8)
        for i, record in enumerate(records):
            features = parse_example(record)
            shape, data = features.get("shape"), features.get("data")
            if shape != [height, width, channels] or not data or len(data[0]) != images[i].size:
                raise DatasetError(
                    f"{where}: record {i} has shape {shape}, expected {[height, width, channels]} "
                    f"(datasets.{self.name}.image_size / channels)."
                )
            images[i] = np.frombuffer(data[0], dtype=np.uint8).reshape(height, width, channels)
        return images.transpose(0, 3, 1, 2)
