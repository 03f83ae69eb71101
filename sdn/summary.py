"""The cross-experiment summary: one row per experiment, SDN beside its CNN baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from sdn.atomic import write_text_atomic
from sdn.config import ExperimentConfig
from sdn.errors import ReadmeError
from sdn.hyperparameters import uses_sdn

COLUMNS = [
    "parameters",
    "neg_elbo_bpd",
    "nll_bpd",
    "kl_bpd",
    "beta_vae",
    "factor_vae",
    "mig",
    "dci_disentanglement",
    "dci_completeness",
    "dci_informativeness",
]
TEXT_COLUMNS = ("experiment", "dataset", "sdn", "baseline_of")
LOWER_IS_BETTER = ("neg_elbo_bpd", "nll_bpd")  # bits/dim; the scores are better higher
# kl_bpd is neither better nor worse lower: a VAE needs some KL to use its latents
COMPARED = ("neg_elbo_bpd", "nll_bpd", "beta_vae", "factor_vae", "mig", "dci_disentanglement",
            "dci_completeness", "dci_informativeness")


def summary_table(experiments: list[ExperimentConfig], metrics_root: Path) -> pd.DataFrame:
    """Rows for every experiment whose `eval.json` exists, in params.yaml order; each SDN run is
    followed by its baseline. Each metric is followed by its standard error (`<metric>_se`) and,
    where the paper reports the same quantity, by the paper's figure (`paper_<metric>`)."""
    by_name = {cfg.name: cfg for cfg in experiments}
    order: list[str] = []
    for cfg in experiments:
        for name in (cfg.name, cfg.baseline):
            if name and name not in order:
                order.append(name)
    rows = []
    for name in order:
        path = metrics_root / name / "eval.json"
        if not path.exists():
            continue
        cfg = by_name[name]
        values = json.loads(path.read_text())
        row = {
            "experiment": name,
            "dataset": cfg.dataset,
            "model": cfg.kind,
            "sdn": uses_sdn(cfg.model),
            "baseline_of": _baseline_of(name, experiments),
        }
        for col in COLUMNS:
            row[col] = values.get(col)
            if col != "parameters":
                row[f"{col}_se"] = values.get(f"{col}_se")
            if col in cfg.reported:
                row[f"paper_{col}"] = cfg.reported[col]
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all") if not table.empty else table


def _baseline_of(name: str, experiments: list[ExperimentConfig]) -> str:
    return next((cfg.name for cfg in experiments if cfg.baseline == name), "")


def clear_winners(table: pd.DataFrame) -> set[tuple[str, str]]:
    """(experiment, metric) cells where an SDN run and its CNN baseline differ by more than two
    combined standard errors, √(se₁² + se₂²): the better of the two cells."""
    if table.empty or "baseline_of" not in table:
        return set()
    rows = table.set_index("experiment")
    winners = set()
    for baseline, sdn in rows["baseline_of"].items():
        if not sdn or sdn not in rows.index:
            continue
        for col in COMPARED:
            if f"{col}_se" not in rows:
                continue
            a, b = rows.loc[sdn, col], rows.loc[baseline, col]
            se_a, se_b = rows.loc[sdn, f"{col}_se"], rows.loc[baseline, f"{col}_se"]
            if any(pd.isna(v) for v in (a, b, se_a, se_b)):
                continue
            if abs(a - b) > 2 * math.hypot(se_a, se_b):
                lower_wins = col in LOWER_IS_BETTER
                winners.add(((sdn if (a < b) == lower_wins else baseline), col))
    return winners


def _formatted(table: pd.DataFrame, winners: set[tuple[str, str]]) -> pd.DataFrame:
    """Cells as text: `value ± se`, a `*` on a clear winner, the paper's figure as published."""
    shown = table[[c for c in table.columns if not c.endswith("_se")]].copy().astype(object)
    for index, row in table.iterrows():
        for col in shown.columns:
            value = row[col]
            if col in TEXT_COLUMNS or pd.isna(value):
                shown.at[index, col] = "" if pd.isna(value) else value
            elif col == "parameters":
                shown.at[index, col] = f"{int(value):,}"
            elif col.startswith("paper_"):
                shown.at[index, col] = f"{value:g}"
            else:
                se = row.get(f"{col}_se")
                text = f"{value:.4f}" if se is None or pd.isna(se) else f"{value:.4f} ± {se:.4f}"
                shown.at[index, col] = text + (" *" if (row["experiment"], col) in winners else "")
    return shown


def write_summary(table: pd.DataFrame, out_dir: Path) -> None:
    """summary.csv (every column, numbers only) and summary.md (one table per model kind, each
    value ± its standard error)."""
    winners = clear_winners(table)
    sections = ["# Results", ""]
    for kind, title, note in (
        ("density", "Density estimation", "bits/dim on the validation split, lower is better"),
        ("disentanglement", "Disentanglement", "scores in [0, 1], higher is better; −ELBO in bits/dim"),
    ):
        rows = table[table["model"] == kind] if not table.empty else table
        if rows.empty:
            continue
        shown = _formatted(rows.drop(columns=["model"]).dropna(axis=1, how="all"), winners)
        align = ["left" if col in TEXT_COLUMNS else "right" for col in shown.columns]
        sections += [
            f"## {title} ({note})",
            "",
            shown.to_markdown(index=False, colalign=align, disable_numparse=True),
            "",
        ]
    sections += [
        "Each value ± its standard error: over images for bits/dim, over repeated metric draws (a",
        "bootstrap for MIG) for the scores. `*` marks the better of an SDN run and its CNN baseline",
        "where they differ by more than two combined standard errors. `paper_*`: the paper's figure",
        "for the same quantity.",
        "",
        "Generated by `dvc repro summary` from metrics/<experiment>/eval.json.",
    ]
    write_text_atomic(table.to_csv(index=False), out_dir / "summary.csv")
    write_text_atomic("\n".join(sections) + "\n", out_dir / "summary.md")


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def with_results(readme: str, summary_md: str) -> str:
    """README text with the block between the results markers replaced by the summary table."""
    if README_START not in readme or README_END not in readme:
        raise ReadmeError(
            f"README.md lacks the {README_START} / {README_END} markers: put them, each on a line of its "
            "own, where the results table goes, then run `python -m sdn readme` again."
        )
    table = summary_md.split("\n", 1)[1].strip().replace("## ", "#### ")
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{table}\n{README_END}{tail}"
