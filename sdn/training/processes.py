"""The processes of a distributed (DDP) run: launched together, stopped together.

Lightning's own launcher makes the first process rank 0 and starts the others from it: when one
of them dies the others wait in a collective, and when the first is killed (out of memory, say)
the rest keep running. Here the process that starts a run only watches: it starts one process
per rank (this same command, told its rank through the variables Lightning reads, so Lightning
launches nothing itself), each in its own process group and set to die with it. When one fails,
it kills every group (ranks and their loader workers) and raises one `TrainingProcessError`
carrying the failed rank's own `error:` message, or how it ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from sdn.errors import TrainingProcessError
from sdn.pipeline import RANK_ERROR_FILE

POLL_SECONDS = 0.1
GONE_WITHIN_SECONDS = 10.0


def launched_rank() -> int | None:
    """This process's rank in a run whose processes were started for it (by `run_ranks`, or by a
    launcher such as torchrun), or None in a process that starts a run."""
    rank = os.environ.get("LOCAL_RANK")
    return None if rank is None else int(rank)


def reports_for_the_run() -> bool:
    """Whether this process prints what the whole run does: the one that starts the run, or rank 0
    of processes another launcher (torchrun, a cluster's) started."""
    rank = launched_rank()
    return rank is None or (rank == 0 and RANK_ERROR_FILE not in os.environ)


def this_command() -> list[str]:
    """The command line this process was started with, to start it again (as Lightning does)."""
    import __main__

    if getattr(__main__, "__spec__", None) is None:
        return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return [sys.executable, "-m", __main__.__spec__.name, *sys.argv[1:]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In a child, before it runs: SIGKILL when the parent dies (Linux), so that no rank outlives
    the process watching it, however that one ends."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _kill_groups(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILL each process's group (the rank and its loader workers), then wait until all are gone."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait()
    deadline = time.monotonic() + GONE_WITHIN_SECONDS
    for process in processes:  # workers of a killed rank are reaped by whoever adopted them
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (a scheduler or `kill`) as SystemExit, so the ranks are stopped on the way out."""
    def stop(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_failure(processes: Sequence[subprocess.Popen]) -> int | None:
    """Wait until every process has ended well (None) or one has failed (its index)."""
    while True:
        codes = [process.poll() for process in processes]
        for rank, code in enumerate(codes):
            if code:
                return rank
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_SECONDS)


def _how_it_ended(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed ({name}{', perhaps out of memory' if name == 'SIGKILL' else ''})"
    return f"ended with exit status {code} (its output above says why)"


def run_ranks(world: int, command: Sequence[str] | None = None) -> None:
    """Run `command` (by default this process's own) as ranks 0..world-1 of one DDP run on this
    machine and wait for them. If one fails, every rank is killed and a TrainingProcessError
    names the failure; an interrupt or SIGTERM of this process also stops every rank."""
    command = list(command or this_command())
    port = _free_port()
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="sdn-ranks-") as errors, _sigterm_raises():
        reports = [Path(errors) / f"rank{rank}" for rank in range(world)]
        try:
            for rank in range(world):
                env = {
                    **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0",
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), RANK_ERROR_FILE: str(reports[rank]),
                }
                processes.append(subprocess.Popen(
                    command, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                ))
            failed = _first_failure(processes)
        finally:
            _kill_groups(processes)  # after a failure, an interrupt or a clean end alike
        if failed is None:
            return
        reported = [rank for rank, report in enumerate(reports) if report.exists()]
        if reported:  # the failure a rank could name (a diverged run, bad data) over the ranks it took down
            rank = reported[0]
            message = reports[rank].read_text().strip().removeprefix("error: ")
            raise TrainingProcessError(
                f"{message} (rank {rank} of {world}; all {world} training processes were stopped)"
            )
        code = processes[failed].returncode
        raise TrainingProcessError(
            f"training process rank {failed} of {world} {_how_it_ended(code)}; all {world} training "
            "processes were stopped. The last checkpoint is kept: rerun the same command to resume from it."
        )
