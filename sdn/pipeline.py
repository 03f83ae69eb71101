"""Where each stage reads and writes, and the wrapper that gives stages clean errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
# Set for each process of a distributed run: a known failure's `error:` line goes to this file,
# and the process that launched the run reports it once (sdn.training.processes).
RANK_ERROR_FILE = "SDN_RANK_ERROR_FILE"


def raw_dir(dataset: str) -> Path:
    return DATA / "raw" / dataset


def lmdb_dir(dataset: str) -> Path:
    return DATA / "lmdb" / dataset


def checkpoint_dir(experiment: str) -> Path:
    return DATA / "checkpoints" / experiment


def metrics_dir(experiment: str) -> Path:
    return METRICS / experiment


def _one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives wrapped,
    with the worker's traceback in its message: keep only the original message."""
    message = str(error)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(message.split())


def run_stage(main: Callable[..., None], usage: str) -> None:
    """Run a stage's `main` with its command-line arguments (none, or the one name that `usage`
    shows). `--help` prints the usage and the stage's docstring (what it writes). A known failure
    (bad parameters or data, a missing input, a local write failure, a damaged checkpoint, a
    diverged run) ends with one `error:` line on stderr and exit status 1; anything else is a bug
    and keeps its traceback."""
    from sdn.errors import SDNError, write_failure

    takes_name = "<" in usage
    args = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in args):
        doc = sys.modules[main.__module__].__doc__ or ""
        print(f"usage: {usage}\n\n{doc.strip()}")
        sys.exit(0)
    # sys.exit(message) prints the message to stderr and exits with status 1
    if len(args) != int(takes_name) or any(arg.startswith("-") for arg in args):
        sys.exit(f"usage: {usage}  (--help: what it does and writes)")
    try:
        main(*args)
    except (SDNError, FileNotFoundError) as err:
        _fail(f"error: {_one_line(err)}")
    except OSError as err:
        why = write_failure(err, err.filename or ".")
        if why is None:
            raise
        _fail(f"error: {why} while writing {err.filename}: free space (or fix the permissions), then "
              f"rerun the same command. ({err.strerror})")


def _fail(line: str) -> None:
    """Exit with status 1 and `line` on stderr, or, in a process of a distributed run, in the file
    its launcher reads (so that the run ends with one such line, not one per process)."""
    report = os.environ.get(RANK_ERROR_FILE)
    if report:
        Path(report).write_text(line + "\n")
        sys.exit(1)
    sys.exit(line)
