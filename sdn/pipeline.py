"""Where each stage reads and writes, and the wrapper that gives stages clean errors."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository this `sdn` belongs to
CODE_ROOTS = ("sdn", "stages")  # a dep under these is code; the others are data
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


def stage_code_deps(stage: str, root: Path = CHECKOUT) -> list[str]:
    """The code (files and folders of `sdn/` and `stages/`) that `root`/dvc.yaml lists as the
    deps of `stage`: what DVC hashes to decide that the stage's code changed."""
    import yaml

    from sdn.errors import ConfigError

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise ConfigError(f"{dvc_yaml} not found: stages run from a checkout of the repository.")
    spec = (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).get(stage)
    if not isinstance(spec, dict):
        raise ConfigError(f"{dvc_yaml} has no stage `{stage}`.")
    deps = spec.get("do", spec).get("deps") or []
    return [dep for dep in deps if isinstance(dep, str) and dep.split("/")[0] in CODE_ROOTS]


def code_fingerprint(paths: Iterable[Path | str], root: Path = CHECKOUT) -> str:
    """A hash of the Python sources under `paths` (files, or folders as a DVC stage lists them
    among its deps), relative to `root`. Bytecode caches are left out, as .dvcignore leaves them
    out of DVC's hashes."""
    digest = hashlib.sha256()
    for given in sorted(str(path) for path in paths):
        path = root / given
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def stage_code(stage: str, root: Path = CHECKOUT) -> str:
    """What the code of `stage` is, as a checkpoint records it: the `code_fingerprint` of the code
    deps that dvc.yaml lists for it, in the checkout this `sdn` belongs to."""
    return code_fingerprint(stage_code_deps(stage, root), root)


def one_line(error: BaseException) -> str:
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

    _check_checkout(main)
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
        _fail(f"error: {one_line(err)}")
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


def _check_checkout(main: Callable[..., None]) -> None:
    """A stage runs the `sdn` of the checkout its script sits in (stages/repo_root.py puts it first
    on sys.path): anything else would let dvc.lock record code that did not run."""
    script = sys.modules[main.__module__].__file__
    if script is None:
        return
    here = (Path(script).resolve().parents[1] / "sdn").resolve()
    loaded = Path(__file__).resolve().parent
    if loaded != here:
        _fail(f"error: {script} imported sdn from {loaded}, not from its own checkout ({here}): "
              "import stages/repo_root.py first in every stage script.")
