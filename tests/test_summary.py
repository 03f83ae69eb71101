"""The summary table and the README's copy of it."""

import json
from pathlib import Path

import pytest

from sdn.config import validate_params
from sdn.params import load_params
from sdn.summary import (
    README_END,
    README_START,
    clear_winners,
    summary_table,
    with_results,
    write_summary,
)

REPO = Path(__file__).resolve().parents[1]


def test_readme_shows_the_committed_summary():
    readme = (REPO / "README.md").read_text()
    summary = (REPO / "metrics" / "summary.md").read_text()
    assert with_results(readme, summary) == readme, "README is stale: run `make readme`"


def test_with_results_replaces_only_the_block():
    readme = f"intro\n{README_START}\nold table\n{README_END}\noutro\n"
    updated = with_results(readme, "# Results\n\n## Density\n\n| a |\n|---|\n| 1 |\n")
    assert updated.startswith("intro\n") and updated.endswith("outro\n")
    assert "old table" not in updated and "| 1 |" in updated and "#### Density" in updated


def test_with_results_needs_the_markers():
    with pytest.raises(ValueError, match="markers"):
        with_results("no markers here", "# Results\n")


def test_summary_puts_each_sdn_run_beside_its_baseline(tmp_path):
    experiments = validate_params(load_params(REPO / "params.yaml"))
    for name, bpd in (("photos32-cnn", 5.5), ("photos32-sdn", 5.25), ("cifar10-sdn", 2.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"neg_elbo_bpd": bpd, "nll_bpd": bpd - 0.1}))
    table = summary_table(experiments, tmp_path)
    assert list(table["experiment"]) == ["photos32-sdn", "photos32-cnn", "cifar10-sdn"]
    assert list(table["baseline_of"]) == ["", "photos32-sdn", ""]
    # the paper's CIFAR-10 figure is an importance-weighted NLL: it sits beside our NLL only
    assert table.set_index("experiment").loc["cifar10-sdn", "paper_nll_bpd"] == 2.87
    assert "paper_neg_elbo_bpd" not in table
    columns = list(table.columns)
    assert columns.index("paper_nll_bpd") == columns.index("nll_bpd") + 1
    write_summary(table, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "## Density estimation" in text and "Disentanglement" not in text
    assert (tmp_path / "summary.csv").read_text().startswith("experiment,")


def write_eval(root: Path, name: str, values: dict[str, float]) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "eval.json").write_text(json.dumps(values))


@pytest.fixture
def experiments():
    return validate_params(load_params(REPO / "params.yaml"))


def test_values_are_shown_with_their_errors(tmp_path: Path, experiments) -> None:
    write_eval(tmp_path, "photos32-sdn", {"neg_elbo_bpd": 5.25, "neg_elbo_bpd_se": 0.0125})
    write_eval(tmp_path, "photos32-cnn", {"neg_elbo_bpd": 5.5})
    table = summary_table(experiments, tmp_path)
    assert table.set_index("experiment").loc["photos32-sdn", "neg_elbo_bpd_se"] == 0.0125
    write_summary(table, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "5.2500 ± 0.0125 |" in text and " 5.5000 |" in text  # no error, no ±
    assert "neg_elbo_bpd_se" in (tmp_path / "summary.csv").read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("sdn", "cnn", "winner"),
    [
        ({"nll_bpd": 5.0, "nll_bpd_se": 0.03}, {"nll_bpd": 5.1, "nll_bpd_se": 0.03}, "photos32-sdn"),
        # 0.08 apart, two combined errors are 2·√(0.03² + 0.03²) ≈ 0.085: no clear winner
        ({"nll_bpd": 5.0, "nll_bpd_se": 0.03}, {"nll_bpd": 5.08, "nll_bpd_se": 0.03}, None),
        ({"nll_bpd": 5.3, "nll_bpd_se": 0.01}, {"nll_bpd": 5.1, "nll_bpd_se": 0.01}, "photos32-cnn"),
    ],
)
def test_clear_winner_by_two_combined_errors(tmp_path: Path, experiments, sdn, cnn, winner) -> None:
    write_eval(tmp_path, "photos32-sdn", sdn)
    write_eval(tmp_path, "photos32-cnn", cnn)
    table = summary_table(experiments, tmp_path)
    assert clear_winners(table) == ({(winner, "nll_bpd")} if winner else set())
    write_summary(table, tmp_path)
    marked = [line for line in (tmp_path / "summary.md").read_text().splitlines() if " *" in line]
    assert [line.split("|")[1].strip() for line in marked] == ([winner] if winner else [])


def test_higher_scores_win(tmp_path: Path, experiments) -> None:
    write_eval(tmp_path, "sprites-sdn", {"mig": 0.30, "mig_se": 0.01, "kl_bpd": 0.1, "kl_bpd_se": 0.001})
    write_eval(tmp_path, "sprites-cnn", {"mig": 0.10, "mig_se": 0.01, "kl_bpd": 0.2, "kl_bpd_se": 0.001})
    # a larger KL is neither better nor worse: only the score is marked
    assert clear_winners(summary_table(experiments, tmp_path)) == {("sprites-sdn", "mig")}
