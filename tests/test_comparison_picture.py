"""metrics/comparison.png, drawn with matplotlib: each SDN/CNN pair on shared axes with its final
evaluation and standard error; drawn from val.csv and eval.json fixtures built here, with a
registry of toy runs (one of them imported, as `celebahq256-release` is)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image, ImageChops

from sdn.params import load_params
from sdn.plots import RUN_COLOURS, comparison_figure, draw_comparison, picture_size
from sdn.registry import check_registry
from tests.import_closure import import_closure
from tests.pipeline_project import REPO

PARAMS = {
    "experiments": {
        "toy-sdn": {"dataset": "toy", "baseline": "toy-cnn"},
        "toy-cnn": {"dataset": "toy", "baseline": None},
        "toy-long-sdn": {"dataset": "toy", "baseline": "toy-long-cnn"},
        "toy-long-cnn": {"dataset": "toy", "baseline": None},
        "toy-new-sdn": {"dataset": "toy", "baseline": "toy-new-cnn"},  # enabled, not trained yet
        "toy-new-cnn": {"dataset": "toy", "baseline": None},
        # published weights: never trained here, so no val.csv, but an eval.json
        "toy-release": {"dataset": "toy", "release": {"file": "toy.ckpt", "sha256": None}},
    }
}
PAIRS = ["toy-sdn", "toy-cnn", "toy-long-sdn", "toy-long-cnn"]
# run -> (its last step, its final −ELBO and standard error, KL and standard error)
EVALUATED = {
    "toy-sdn": (800, (4.89, 0.017), (0.144, 0.0016)),
    "toy-cnn": (800, (4.91, 0.015), (0.137, 0.0014)),
    "toy-long-sdn": (6000, (3.87, 0.037), (0.272, 0.0018)),
    "toy-long-cnn": (6000, (3.86, 0.040), (0.256, 0.0018)),
}


def enabled(*names: str) -> dict[str, str]:
    return {name: PARAMS["experiments"][name]["dataset"] for name in names}


def write_eval(metrics: Path, run: str, neg_elbo: tuple[float, float], kl: tuple[float, float]) -> None:
    (metrics / run).mkdir(parents=True, exist_ok=True)
    (metrics / run / "eval.json").write_text(json.dumps({
        "neg_elbo_bpd": neg_elbo[0], "neg_elbo_bpd_se": neg_elbo[1], "kl_bpd": kl[0], "kl_bpd_se": kl[1],
        "num_images": 256,
    }))


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    """metrics/<run>/{val.csv,eval.json} of the two trained pairs (curves falling like −ELBO and
    rising like KL, with four or twelve validations), and the imported run's eval.json alone."""
    root = tmp_path / "metrics"
    for i, (run, (last, neg_elbo, kl)) in enumerate(EVALUATED.items()):
        every = last // 4 if last <= 800 else last // 12
        rows = [f"{step},{neg_elbo[0] + 2 / (1 + step / 200) + 0.05 * i},{kl[0] * step / last},563"
                for step in range(every, last + 1, every)]
        write_eval(root, run, neg_elbo, kl)
        (root / run / "val.csv").write_text("\n".join(["step,neg_elbo_bpd,kl_bpd,images", *rows]) + "\n")
    write_eval(root, "toy-release", (0.70, 0.01), (0.2, 0.001))
    return root


def white_share(panel: Image.Image) -> float:
    pixels = np.asarray(panel.convert("RGB")).reshape(-1, 3)
    return float((pixels == 255).all(axis=1).mean())


def near(panel: Image.Image, colour: str, tolerance: int = 12) -> int:
    """How many pixels of `panel` are within `tolerance` of `colour` (#rrggbb) in every channel."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(panel.convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - target) <= tolerance).all(axis=1).sum())


def shown_tick_labels(axis) -> list:
    """The tick labels an axis draws: those of its ticks within the view limits."""
    low, high = sorted(axis.get_view_interval())
    return [tick.label1 for tick in axis.get_major_ticks() if low <= tick.get_loc() <= high]


def test_picture_has_a_readable_size_and_every_panel_shows_both_runs_of_its_pair(
    metrics: Path, tmp_path: Path
) -> None:
    out = draw_comparison(PARAMS, enabled(*PAIRS), tmp_path / "comparison.png", metrics)
    image = Image.open(out)
    # two pairs, a row each; 1000 px wide: legible where the README shows it (about 880 px)
    assert image.size == picture_size(2) == (1000, 680)
    assert white_share(image) < 0.95

    figure = comparison_figure(PARAMS, enabled(*PAIRS), metrics)
    figure.canvas.draw()
    assert len(figure.axes) == 4  # -ELBO and KL of each pair
    for ax in figure.axes:
        box = ax.get_window_extent()
        # PIL counts rows from the top, matplotlib from the bottom
        panel = image.crop((box.x0, image.height - box.y1, box.x1, image.height - box.y0))
        assert white_share(panel) < 0.9, ax.get_title()
        assert len(panel.convert("RGB").getcolors(panel.width * panel.height)) > 50, ax.get_title()
        sdn, cnn = (near(panel, colour) for colour in RUN_COLOURS)
        assert sdn > 50 and cnn > 50, ax.get_title()  # both curves, in their own colours


def test_each_pair_shares_axes_over_every_step_with_labels_inside_the_picture(metrics: Path) -> None:
    figure = comparison_figure(PARAMS, enabled(*PAIRS), metrics)
    figure.canvas.draw()
    picture = figure.bbox
    titles = [ax.get_title(loc="left") for ax in figure.axes]
    assert titles == ["toy: validation -ELBO (bits/dim)", "toy: validation KL (bits/dim)",
                      "toy-long: validation -ELBO (bits/dim)", "toy-long: validation KL (bits/dim)"]
    for ax, (sdn, cnn) in zip(figure.axes, [PAIRS[:2]] * 2 + [PAIRS[2:]] * 2, strict=True):
        last = EVALUATED[sdn][0]
        assert [text.get_text() for text in ax.get_legend().get_texts()] == [sdn, cnn]
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > last  # the whole run, and room right of it
        x_labels, y_labels = shown_tick_labels(ax.xaxis), shown_tick_labels(ax.yaxis)
        assert str(last) in [label.get_text() for label in x_labels]  # "6000" is shown
        assert len(y_labels) >= 4 and ax.xaxis.get_gridlines()[0].get_visible()
        for label in [*x_labels, *y_labels, ax.xaxis.label, ax.yaxis.label, ax.title]:
            extent = label.get_window_extent()
            assert picture.x0 <= extent.x0 and extent.x1 <= picture.x1, label.get_text()  # not cut off
            assert picture.y0 <= extent.y0 and extent.y1 <= picture.y1, label.get_text()


def test_final_evaluation_is_marked_with_its_standard_error(metrics: Path) -> None:
    (metrics / "toy-cnn" / "eval.json").unlink()  # not evaluated yet: a curve, no mark
    figure = comparison_figure(PARAMS, enabled(*PAIRS), metrics)
    for ax, column in zip(figure.axes, (1, 2, 1, 2), strict=True):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        group = PAIRS[:1] if ax in figure.axes[:2] else PAIRS[2:]
        assert len(bars) == len(group), ax.get_title()
        for bar, run in zip(bars, group, strict=True):
            last, value, error = EVALUATED[run][0], *EVALUATED[run][column]
            (segment,) = bar.lines[2][0].get_segments()
            (x, low), (_, high) = segment
            assert last < x < ax.get_xlim()[1]  # just right of the curve's end, inside the axes
            assert (low, high) == pytest.approx((value - error, value + error))


def test_imported_run_and_runs_not_trained_yet_take_no_panel(metrics: Path, tmp_path: Path) -> None:
    pairs = draw_comparison(PARAMS, enabled(*PAIRS), tmp_path / "pairs.png", metrics)
    everything = draw_comparison(PARAMS, enabled(*PARAMS["experiments"]), tmp_path / "all.png", metrics)
    assert Image.open(everything).size == picture_size(2)
    assert ImageChops.difference(Image.open(pairs), Image.open(everything)).getbbox() is None
    figure = comparison_figure(PARAMS, enabled("toy-release", "toy-new-sdn", "toy-new-cnn"), metrics)
    assert figure.axes == [] and figure.bbox.height == picture_size(1)[1]


def test_a_pair_whose_baseline_has_not_validated_yet_names_it(metrics: Path) -> None:
    (metrics / "toy-cnn" / "val.csv").unlink()
    figure = comparison_figure(PARAMS, enabled("toy-sdn", "toy-cnn"), metrics)
    for ax in figure.axes:
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert legend == ["toy-sdn", "toy-cnn: no curve yet"]


def test_only_the_comparison_stage_imports_matplotlib() -> None:
    # matplotlib takes seconds to import: only the stage that draws may pay for it
    importers = set()
    for module in (REPO / "sdn").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "matplotlib" for name in names):
                importers.add(str(module.relative_to(REPO)))
    assert importers == {"sdn/plots.py"}
    for stage in sorted((REPO / "stages").glob("*.py")):
        drawing = Path("sdn/plots.py") in import_closure(stage, REPO)
        assert drawing == (stage.name == "comparison.py"), stage.name


def test_committed_comparison_picture_is_the_one_the_curves_give(tmp_path: Path) -> None:
    # the committed picture against the committed curves and registry
    params = load_params(REPO / "params.yaml")
    drawn = draw_comparison(params, check_registry(params, REPO), tmp_path / "c.png", REPO / "metrics")
    committed = Image.open(REPO / "metrics" / "comparison.png").convert("RGB")
    assert ImageChops.difference(Image.open(drawn).convert("RGB"), committed).getbbox() is None, \
        "metrics/comparison.png is stale: run `dvc repro comparison` (or `make plots`)"
