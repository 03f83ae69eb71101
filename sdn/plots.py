"""metrics/comparison.png: each SDN run's validation curves beside its CNN baseline's, drawn with
Pillow from the committed val.csv files (the picture the README shows; `make plots` redraws it).

`dvc plots show` renders the same comparisons interactively (dvc.yaml's top-level `plots`)."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdn.atomic import atomic_write
from sdn.registry import COMPARED, METRICS, comparison_groups

PANEL_W, PANEL_H, MARGIN = 420, 260, 58
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def read_curve(path: Path, column: str) -> list[tuple[float, float]]:
    with path.open() as handle:
        return [(float(row["step"]), float(row[column])) for row in csv.DictReader(handle) if row[column]]


def _panel(title: str, curves: dict[str, list[tuple[float, float]]], font) -> Image.Image:
    image = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 6), title, fill="black", font=font)
    points = [p for curve in curves.values() for p in curve]
    left, top, right, bottom = MARGIN, 28, PANEL_W - 12, PANEL_H - 52
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if not points:
        draw.text((left + 10, top + 10), "no curve yet", fill="gray", font=font)
        return image
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.01 + 1e-9)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for value, y in ((y0, bottom), (y1, top)):
        draw.text((4, y - 6), f"{value:.4g}", fill="black", font=font)
    for value, x in ((x0, left), (x1, right)):
        draw.text((x - 10, bottom + 4), f"{value:.0f}", fill="black", font=font)
    draw.text(((left + right) // 2 - 12, bottom + 4), "step", fill="black", font=font)
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in curve]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
        legend = left + 160 * i
        draw.line((legend, PANEL_H - 16, legend + 18, PANEL_H - 16), fill=colour, width=3)
        draw.text((legend + 24, PANEL_H - 22), name, fill=colour, font=font)
    return image


def draw_comparison(params: dict, runs: dict[str, str], out: Path, metrics: Path = METRICS) -> Path:
    """One row per SDN/CNN pair (validation −ELBO, KL), written atomically to `out`."""
    font = ImageFont.load_default()
    rows = []
    for group in comparison_groups(params, runs):
        panels = []
        for column, title in COMPARED:
            curves = {}
            for run in group:
                path = metrics / run / "val.csv"
                curves[run] = read_curve(path, column) if path.is_file() else []
            panels.append(_panel(f"{group[0].rsplit('-', 1)[0]}: {title}", curves, font))
        rows.append(panels)
    sheet = Image.new("RGB", (PANEL_W * len(COMPARED), PANEL_H * max(len(rows), 1)), "white")
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            sheet.paste(panel, (c * PANEL_W, r * PANEL_H))
    return atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
