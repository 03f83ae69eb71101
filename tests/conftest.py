"""Fixtures shared by the test modules that train a micro model (`tests.reliability_tools`).

`isolated_torch` is not autouse: a module whose tests train in this process asks for it with
`pytestmark = pytest.mark.usefixtures("isolated_torch")`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers (torch, Lightning, the training code) are imported by the fixtures that use them, so
# that collecting the tests that need none of them stays quick.


@pytest.fixture
def workdir(tmp_path: Path):
    """A project root with params.yaml and random images (`tests.reliability_tools.Workdir`)."""
    from tests.reliability_tools import Workdir

    return Workdir(tmp_path)


@pytest.fixture
def isolated_torch() -> Iterator[None]:
    """Lightning's seeding and `deterministic=True` change process-wide state: put it back."""
    import torch

    environ, threads = dict(os.environ), torch.get_num_threads()
    deterministic, rng = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    # micro models run fastest on one thread, here and in the subprocesses; the cores are shared
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose sitecustomize.py loads the fault injector (`reliability_tools.FAULTS`)."""
    from tests.reliability_tools import FAULTS

    folder = tmp_path_factory.mktemp("faults")
    (folder / "sitecustomize.py").write_text(FAULTS)
    return folder
