"""The training progress bar counts optimizer steps out of `train.max_steps`, from the step a
resumed run starts at (Lightning's own bar read `Epoch 0/-2` for these one-epoch runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdn.config import ExperimentConfig, experiment_config
from tests.reliability_tools import EXPERIMENT, CrashAt, SimulatedCrash, Workdir, tiny_params

BAR = re.compile(r"step (\d+)/(\d+) \|")


def with_progress_bar(**train) -> ExperimentConfig:
    params = tiny_params(**train)
    params["trainer"]["progress_bar"] = True
    return experiment_config(params, EXPERIMENT)


def bar_states(output: str) -> list[tuple[int, int]]:
    """(step, max_steps) of every state the training bar was drawn in, in order."""
    return [(int(step), int(total)) for step, total in BAR.findall(output)]


def test_bar_counts_optimizer_steps_of_max_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # two micro-batches a step: Lightning's tqdm bar would count 12 batches
    Workdir(tmp_path).train(with_progress_bar(max_steps=6, accumulate_grad_batches=2))
    output = capsys.readouterr().out
    states = bar_states(output)
    assert {total for _, total in states} == {6}
    assert [step for step, _ in states if step] == sorted(step for step, _ in states if step)
    assert {step for step, _ in states} == set(range(7))  # 0 to 6, each step shown
    assert "Epoch" not in output


def test_resumed_run_bar_starts_at_the_checkpoint_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = Workdir(tmp_path)
    cfg = with_progress_bar(max_steps=6)
    with pytest.raises(SimulatedCrash):
        work.train(cfg, [CrashAt(6)])
    capsys.readouterr()
    work.train(cfg)
    output = capsys.readouterr().out
    resumed_at = int(re.search(r"resuming .* at step (\d+)", output).group(1))
    states = bar_states(output)
    assert resumed_at > 0 and states[0] == (resumed_at, 6) and states[-1] == (6, 6)
    assert min(step for step, _ in states) == resumed_at
