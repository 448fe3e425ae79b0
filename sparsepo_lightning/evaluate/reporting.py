"""Outputs shared by the evaluation commands: JSON summary, CSV table, JSONL samples, PNG plot, TensorBoard.

Plots are drawn with matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import csv
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
    """Draw ``plot`` (series with optional error bars and point labels, optional reference line) to ``path``."""
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
