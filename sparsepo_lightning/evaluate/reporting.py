"""Outputs shared by the evaluation commands: JSON summary, CSV table, JSONL samples, PNG plot, TensorBoard.

Plots use matplotlib when it is installed and otherwise a small Pillow renderer (Pillow comes with
TensorBoard), so every command writes its PNG without extra dependencies.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Series:
    """One labelled set of points of a plot; ``low``/``high`` (optional) draw vertical error bars."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None
    point_labels: list[str] = field(default_factory=list)
    """Text written next to each point (e.g. the checkpoint name on a reward-KL frontier)."""


@dataclass
class Plot:
    """A line or scatter plot."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    lines: bool = True
    """Join the points of each series (False: scatter)."""
    hline: float | None = None
    """A dashed horizontal reference line (e.g. win rate 0.5)."""


class Report:
    """Writes the files of one command into ``out_dir`` as ``<name>.json``, ``<name>.csv``, ...

    Args:
        out_dir: created if missing; TensorBoard event files go there too.
        name: file stem and TensorBoard tag prefix (``sentiment``, ``code``...).
    """

    def __init__(self, out_dir: str | Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir, self.name = Path(out_dir), name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.out_dir))
        self.paths: dict[str, Path] = {}

    def write_json(self, summary: Mapping[str, Any]) -> Path:
        return self._record("json", self.out_dir / f"{self.name}.json", json.dumps(summary, indent=2) + "\n")

    def write_csv(self, rows: Sequence[Mapping[str, Any]], suffix: str = "") -> Path:
        path = self.out_dir / f"{self.name}{suffix}.csv"
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.paths[f"csv{suffix}"] = path
        return path

    def write_jsonl(self, rows: Sequence[Mapping[str, Any]], suffix: str = "_samples") -> Path:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return self._record("samples", self.out_dir / f"{self.name}{suffix}.jsonl", text)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars ``<name>/<key>`` at ``step``."""
        for key, value in values.items():
            self.writer.add_scalar(f"{self.name}/{key}", value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(f"{self.name}/{tag}", text)

    def plot(self, plot: Plot) -> Path:
        """Render ``plot`` to ``<name>.png`` and log the image to TensorBoard."""
        path = self.out_dir / f"{self.name}.png"
        render_png(plot, path)
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
        self.writer.add_image(f"{self.name}/plot", pixels, dataformats="HWC")
        self.paths["png"] = path
        return path

    def close(self) -> dict[str, Path]:
        """Flush TensorBoard and return the written files by kind."""
        self.writer.close()
        self.paths["tensorboard"] = self.out_dir
        log.info("Wrote %s", ", ".join(str(p) for p in self.paths.values()))
        return self.paths

    def _record(self, kind: str, path: Path, text: str) -> Path:
        path.write_text(text, encoding="utf-8")
        self.paths[kind] = path
        return path


def render_png(plot: Plot, path: Path) -> None:
    """matplotlib when available, else the Pillow renderer."""
    if importlib.util.find_spec("matplotlib") is not None:
        _render_matplotlib(plot, path)
    else:
        _render_pillow(plot, path)


def _render_matplotlib(plot: Plot, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for s in plot.series:
        errors = None if s.low is None else [np.subtract(s.y, s.low), np.subtract(s.high, s.y)]
        ax.errorbar(s.x, s.y, yerr=errors, label=s.label, marker="o", linestyle="-" if plot.lines else "none",
                    capsize=3)  # fmt: skip
        for x, y, text in zip(s.x, s.y, s.point_labels, strict=False):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if plot.hline is not None:
        ax.axhline(plot.hline, color="grey", linestyle="--", linewidth=1)
    ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_SIZE, _LEFT, _RIGHT, _TOP, _BOTTOM = (720, 480), 70, 100, 40, 50  # right margin: room for point labels


def _render_pillow(plot: Plot, path: Path) -> None:
    """A plain plot (axes, 5 ticks per axis, markers, lines, error bars, labels, legend) drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    xs = [x for s in plot.series for x in s.x]
    ys = [y for s in plot.series for y in [*s.y, *(s.low or []), *(s.high or [])]] + (
        [plot.hline] if plot.hline is not None else []
    )
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    width, height = _SIZE[0] - _LEFT - _RIGHT, _SIZE[1] - _TOP - _BOTTOM

    def to_px(x: float, y: float) -> tuple[float, float]:
        return _LEFT + (x - x0) / (x1 - x0) * width, _TOP + (1 - (y - y0) / (y1 - y0)) * height

    draw.rectangle([_LEFT, _TOP, _LEFT + width, _TOP + height], outline="black")
    for i in range(5):
        tx, ty = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        px, py = to_px(tx, ty)
        draw.line([px, _TOP + height, px, _TOP + height + 4], fill="black")
        draw.text((px - 12, _TOP + height + 6), f"{tx:.3g}", fill="black")
        draw.line([_LEFT - 4, py, _LEFT, py], fill="black")
        draw.text((_LEFT - 44, py - 5), f"{ty:.3g}", fill="black")
    if plot.hline is not None:
        _, py = to_px(x0, plot.hline)
        for px in range(_LEFT, _LEFT + width, 8):
            draw.line([px, py, px + 4, py], fill="grey")
    for k, s in enumerate(plot.series):
        color = _COLORS[k % len(_COLORS)]
        finite = [i for i, (x, y) in enumerate(zip(s.x, s.y, strict=True)) if np.isfinite(x) and np.isfinite(y)]
        points = {i: to_px(s.x[i], s.y[i]) for i in finite}  # NaN metrics (e.g. self-BLEU of 1 sample) are skipped
        if plot.lines and len(points) > 1:
            draw.line(list(points.values()), fill=color, width=2)
        for i, (px, py) in points.items():
            if s.low is not None and s.high is not None:
                draw.line([to_px(s.x[i], s.low[i]), to_px(s.x[i], s.high[i])], fill=color, width=1)
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
            if i < len(s.point_labels):
                draw.text((px + 6, py - 12), s.point_labels[i], fill=color)
        draw.text((_LEFT + 8, _TOP + 6 + 12 * k), f"- {s.label}", fill=color)
    draw.text((_LEFT, 12), plot.title, fill="black")
    draw.text((_LEFT + width // 2 - 3 * len(plot.xlabel), _SIZE[1] - 22), plot.xlabel, fill="black")
    draw.text((6, _TOP - 16), plot.ylabel, fill="black")
    image.save(path)


def _span(values: list[float]) -> tuple[float, float]:
    """Axis limits with 5% padding; a single value gets a unit-wide axis."""
    finite = [v for v in values if np.isfinite(v)] or [0.0]
    low, high = min(finite), max(finite)
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    return low - pad, high + pad
