"""Every error the project raises on purpose, in one hierarchy.

A stage (or `python -m sdn`) ends a run that raises an `SDNError` with its message on one line:
each message names what is wrong (the dotted params.yaml key, the file) and what to do next.
Each class also derives from the builtin it refines (`ValueError` for bad settings,
`RuntimeError` for failures at run time, `FileNotFoundError` for a missing stage output), so
callers that catch the builtin keep working.
"""

from __future__ import annotations

import difflib
import errno
import os
import resource
import shutil
from collections.abc import Iterable
from pathlib import Path


class SDNError(Exception):
    """Base class of every failure the project explains in its message."""


# Settings


class ConfigError(SDNError, ValueError):
    """A bad value in `params.yaml` (or a config dict); the message names the key and the fix."""


class RegistryError(SDNError, ValueError):
    """dvc.yaml's generated blocks (the registry of enabled runs) are missing, malformed or out of date."""


class ReadmeError(SDNError, ValueError):
    """README.md has no place for the results table (its markers are missing)."""


# Data


class DataError(SDNError, RuntimeError):
    """Base class of every data failure (download, checksum, conversion, reading)."""


class DownloadError(DataError):
    """A remote file could not be fetched completely (no network, HTTP error, cut transfer)."""


class ChecksumError(DownloadError):
    """A downloaded or hand-placed file does not match the checksum pinned in params.yaml."""


class DatasetError(DataError):
    """Raw or converted data that is corrupt, incomplete or not what the configuration expects."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A stage output that should exist does not (a raw dataset, a converted split): the message
    names the DVC stage that builds it. Every reader of a split raises this one type for a missing
    split."""


class LocalWriteError(DataError):
    """Writing a local file failed for a local reason (full disk, file size limit, permissions):
    retrying or downloading again cannot help."""


# Training and checkpoints


class NonFiniteLossError(SDNError, RuntimeError):
    """Training produced a NaN or infinite loss."""


class TrainingProcessError(SDNError, RuntimeError):
    """A process of a distributed run failed; every other one was stopped with it."""


class CheckpointError(SDNError, RuntimeError):
    """A checkpoint that cannot be used: damaged, or made with another configuration."""


class ReleaseCheckpointError(CheckpointError):
    """A file that is not a checkpoint of the release's trainer, or not one this project can map."""


# --------------------------------------------------------------------------------------------
# Naming the local cause of a failed write

_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
_LOW_SPACE = 16 << 20


def write_failure(error: BaseException, path: Path | str) -> str | None:
    """What local cause made writing `path` fail ("disk full", ...), or None if none is seen.

    An OSError carries its errno. LMDB and torch.save report a failed write without one (as
    "Input/output error" or "file write failed"), so for them the machine is examined: free
    space, the process's file size limit (`ulimit -f`) and write permission.
    """
    if isinstance(error, OSError) and error.errno is not None:
        return _REASONS.get(error.errno)
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    try:
        if shutil.disk_usage(folder).free < _LOW_SPACE:
            return "disk full"
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        written = max((p.stat().st_size for p in (path, *path.glob("*")) if p.is_file()), default=0)
        if written + (1 << 20) >= limit:  # within a megabyte of the limit: that write crossed it
            return f"file size limit ({limit} bytes, `ulimit -f`) reached"
    if not os.access(folder, os.W_OK):
        return "permission denied"
    return None


def local_write_error(
    error: BaseException, path: Path | str, rerun: str, shown: Path | str | None = None
) -> LocalWriteError | None:
    """A LocalWriteError naming the cause of a failed write of `path` (called `shown` in the
    message, e.g. the final name of a temporary folder), or None if the cause is not local."""
    why = write_failure(error, path)
    if why is None:
        return None
    fix = {"permission denied": "make its folder writable", "read-only file system": "write elsewhere"}
    return LocalWriteError(
        f"{why} while writing {shown or path}: {fix.get(why, 'free space or raise the limit')}, then "
        f"rerun `{rerun}`. ({error})"
    )


# --------------------------------------------------------------------------------------------
# Naming an unknown name


def did_you_mean(
    name: object, known: Iterable[str], label: str = "Known", listed: Iterable[str] | None = None
) -> str:
    """The end of a message about an unknown `name`: the closest known name as a suggestion
    (" Did you mean 'lr'?"), or, when none is close, the list (" Known: a, b."; `listed` when
    given, else `known`)."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" {label}: {', '.join(known if listed is None else listed) or 'none'}."
