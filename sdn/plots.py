"""metrics/comparison.png: each SDN run's validation curves beside its CNN baseline's on shared
axes, with the final evaluation of each run and its standard error (the picture the README shows;
the `comparison` stage draws it from the enabled runs' val.csv and eval.json files).

Drawn with matplotlib's Agg canvas, without pyplot: no display, no global figure state. Only the
`comparison` stage imports this module, so no other stage loads matplotlib.
`dvc plots show` shows it beside each run's own train.csv and val.csv curves.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sdn.atomic import atomic_write
from sdn.registry import METRICS, comparison_groups

COMPARED = (("neg_elbo_bpd", "validation -ELBO (bits/dim)"), ("kl_bpd", "validation KL (bits/dim)"))

# 1000 px wide: the README shows it at about 880 px, where 10-point text is still easy to read.
DPI = 100
WIDTH_INCHES, ROW_INCHES = 10.0, 3.4
# an SDN run (first of its group) and its CNN baseline; matplotlib's first two default colours
RUN_COLOURS = ("#1f77b4", "#ff7f0e")
# the final evaluations sit just right of the curves' last step, side by side, so that their
# error bars neither cover the last validation point nor each other (fractions of the step range)
EVALUATION_OFFSETS = (0.025, 0.05)
STYLE = {"font.size": 10, "axes.titlesize": 10.5, "legend.fontsize": 9, "axes.spines.top": False,
         "axes.spines.right": False}


def picture_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of the comparison picture with `rows` SDN/CNN groups."""
    return round(WIDTH_INCHES * DPI), round(ROW_INCHES * DPI * max(rows, 1))


def read_curve(path: Path, column: str) -> list[tuple[float, float]]:
    """(step, value) of one column of a val.csv, skipping steps without a value; none before the
    run's first validation (no file yet)."""
    if not path.is_file():
        return []
    with path.open() as handle:
        return [(float(row["step"]), float(row[column])) for row in csv.DictReader(handle) if row.get(column)]


def read_evaluation(path: Path, column: str) -> tuple[float, float] | None:
    """(value, standard error) of `column` in an eval.json, or None where it has no such pair."""
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get(column) is None or metrics.get(f"{column}_se") is None:
        return None
    return float(metrics[column]), float(metrics[f"{column}_se"])


def _curve_style(colour: str) -> dict:
    return {"color": colour, "linewidth": 1.8, "marker": "o", "markersize": 3.5}


def _evaluation_style(colour: str) -> dict:
    return {"color": colour, "marker": "D", "markersize": 4.5, "capsize": 3.5, "elinewidth": 1.4,
            "capthick": 1.4, "linestyle": "none"}


def _panel(ax, title: str, curves: dict[str, list[tuple[float, float]]], column: str, metrics: Path) -> bool:
    """Draw one panel: the `curves` of a group's runs (at least one not empty) and their final
    evaluations; whether it shows one."""
    ax.set_title(title, loc="left")
    ax.set_xlabel("training step")
    ax.set_ylabel("bits/dim")
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    last_step = max(step for curve in curves.values() for step, _ in curve)
    evaluated = False
    for (run, curve), colour, offset in zip(curves.items(), RUN_COLOURS, EVALUATION_OFFSETS, strict=False):
        if not curve:
            ax.plot([], [], color=colour, label=f"{run}: no curve yet")
            continue
        steps, values = zip(*curve, strict=True)
        ax.plot(steps, values, label=run, **_curve_style(colour))
        final = read_evaluation(metrics / run / "eval.json", column)
        if final is not None:
            ax.errorbar(steps[-1] + offset * last_step, final[0], yerr=final[1], **_evaluation_style(colour))
            evaluated = True
    ax.set_xlim(0, last_step * (1 + EVALUATION_OFFSETS[-1] + 0.025))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))
    ax.legend(loc="best", frameon=True, framealpha=0.9, edgecolor="0.8")
    return evaluated


def _key(figure: Figure, evaluated: bool) -> None:
    """What each kind of mark means, once for every panel (each panel's legend names its runs)."""
    grey = "0.4"
    (curve,) = figure.axes[0].plot([], [], **_curve_style(grey))
    marks, meanings = [curve], ["validation while training (val.csv)"]
    if evaluated:
        marks.append(figure.axes[0].errorbar([], [], yerr=[], **_evaluation_style(grey)))
        meanings.append("final evaluation ± 1 standard error over its images (eval.json)")
    figure.legend(marks, meanings, loc="outside lower center", ncols=len(marks), frameon=False)
    for mark in marks:  # drawn only to give the legend its handles: no data of any panel
        mark.remove()


def comparison_figure(params: dict, runs: dict[str, str], metrics: Path = METRICS) -> Figure:
    """One row per SDN/CNN group of the enabled `runs` that has a validation curve (−ELBO, then
    KL). A run without one takes no panel: an imported run (a `release:` section) never trains,
    and a group none of whose runs has validated yet would only show empty axes."""
    curves = {run: {column: read_curve(metrics / run / "val.csv", column) for column, _ in COMPARED}
              for run in runs}
    groups = [group for group in comparison_groups(params, runs)
              if any(any(curves[run].values()) for run in group)]
    width, height = picture_size(len(groups))
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        if not groups:
            figure.text(0.5, 0.5, "no validation curve yet", ha="center", va="center")
            return figure
        axes = figure.subplots(len(groups), len(COMPARED), squeeze=False)
        evaluated = False
        for row, group in zip(axes, groups, strict=True):
            for ax, (column, title) in zip(row, COMPARED, strict=True):
                drawn = {run: curves[run][column] for run in group}
                if any(drawn.values()):
                    evaluated |= _panel(ax, f"{group[0].rsplit('-', 1)[0]}: {title}", drawn, column, metrics)
                else:  # a val.csv without this column
                    ax.set_axis_off()
        _key(figure, evaluated)
    return figure


def draw_comparison(params: dict, runs: dict[str, str], out: Path, metrics: Path = METRICS) -> Path:
    """`comparison_figure` as a PNG, written atomically to `out`."""
    figure = comparison_figure(params, runs, metrics)
    with matplotlib.rc_context(STYLE):
        return atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
