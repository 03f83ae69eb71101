"""The summary table and the README's copy of it."""

import json
from pathlib import Path

import pytest

from sdn.config import load_params, validate_params
from sdn.summary import README_END, README_START, summary_table, with_results, write_summary

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
    assert table.set_index("experiment").loc["cifar10-sdn", "paper_neg_elbo_bpd"] == 2.87
    write_summary(table, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "## Density estimation" in text and "Disentanglement" not in text
    assert (tmp_path / "summary.csv").read_text().startswith("experiment,")
