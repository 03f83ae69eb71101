"""The training curves: train.csv, val.csv and live.json, written while a run goes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from sdn.atomic import write_csv_atomic, write_json_atomic

if TYPE_CHECKING:
    from sdn.training.module import VAEModule


TRAIN_COLUMNS = ("step", "loss_bpd", "neg_elbo_bpd", "kl_bpd", "lr")
VAL_COLUMNS = ("step", "neg_elbo_bpd", "kl_bpd", "images")


class LiveCurves(pl.Callback):
    """Writes the curves while training runs, so that `dvc plots show` and `dvc exp show` follow a
    running run and keep what a killed one reached: train.csv and val.csv grow by whole rows
    (one `write` each, appended after every log interval and validation), live.json holds the
    latest figures (replaced atomically).

    The checkpoint carries its own copy of the rows (`sdn_curves`). When a run starts or resumes,
    the files are rewritten from it: rows a killed run logged after its last checkpoint are
    dropped and logged again, identically, by the resumed run, so the curves of a resumed run
    equal those of an uninterrupted one, with no step missing or repeated."""

    def __init__(self, metrics_dir: Path) -> None:
        self.dir = metrics_dir
        self.written = {"train": 0, "val": 0}

    def _files(self) -> dict[str, tuple[Path, tuple[str, ...]]]:
        return {"train": (self.dir / "train.csv", TRAIN_COLUMNS), "val": (self.dir / "val.csv", VAL_COLUMNS)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: VAEModule) -> None:
        if not trainer.is_global_zero:
            return
        for kind, (path, columns) in self._files().items():
            rows = getattr(pl_module, f"{kind}_rows")
            if rows:  # resumed: the checkpoint's rows replace whatever the files hold
                write_csv_atomic(rows, path, columns)
            self.written[kind] = len(rows)
        if pl_module.train_rows or pl_module.val_rows:
            self._write_latest(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._append(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._append(trainer, pl_module)

    def _append(self, trainer: pl.Trainer, pl_module: VAEModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        grew = False
        for kind, (path, columns) in self._files().items():
            every = getattr(pl_module, f"{kind}_rows")
            rows = every[self.written[kind]:]
            if not rows:
                continue
            if self.written[kind] == 0:
                # the file appears with its first rows, replacing any earlier run's in one step
                write_csv_atomic(every, path, columns)
            else:
                text = "".join(",".join(_csv_value(row.get(c)) for c in columns) + "\n" for row in rows)
                # one write to a file opened for appending: a kill leaves whole rows only
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, text.encode())
                finally:
                    os.close(fd)
            self.written[kind] += len(rows)
            grew = True
        if grew:
            self._write_latest(pl_module)

    def write_all(self, train_rows: list[dict], val_rows: list[dict], step: int) -> None:
        """The complete curves and the figures of `step`, also when there was nothing left to
        train (a finished run run again): DVC removes a stage's outputs before running it."""
        rows = {"train": train_rows, "val": val_rows}
        for kind, (path, columns) in self._files().items():
            write_csv_atomic(rows[kind], path, columns)
        self._write_figures(rows, step)

    def _write_latest(self, pl_module: VAEModule) -> None:
        rows = {kind: getattr(pl_module, f"{kind}_rows") for kind in ("train", "val")}
        self._write_figures(rows, int(pl_module.global_step))

    def _write_figures(self, rows: dict[str, list[dict]], step: int) -> None:
        latest: dict[str, Any] = {"step": step}
        for kind in ("train", "val"):
            if rows[kind]:
                latest[kind] = {k: v for k, v in rows[kind][-1].items() if k != "step"}
        write_json_atomic(latest, self.dir / "live.json", sort_keys=False)


def _csv_value(value: Any) -> str:
    # the format pandas writes, so that appended rows and rewritten files agree byte for byte
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)

