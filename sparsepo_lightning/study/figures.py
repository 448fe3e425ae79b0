"""A study's figures: the reward–KL frontier, mask sparsity over training, token heat-maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsepo_lightning.study import stats
from sparsepo_lightning.study.logs import RunLog, by_method, zeros_curve
from sparsepo_lightning.study.planfile import StudyPlan


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLOURS = ("#1f77b4", "#ff7f0e", "#bcbd22", "#9467bd", "#d62728", "#7f7f7f", "#e377c2", "#8c564b", "#17becf",
           "#2ca02c", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
"""One colour per arm, in plan order (cycled beyond 16 arms)."""


def colour(study: StudyPlan, arm: str) -> str:
    return COLOURS[list(study.arms).index(arm) % len(COLOURS)]
MARKERS = ("o", "s", "^", "D")


def frontier_figure(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any], path: Path) -> None:
    """Every evaluation as a point (colour = arm, marker = seed; a run evaluated at several steps gives several
    points), one Pareto line per arm over all its points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    anchor = (0.0, reference["reward_mean"])
    ax.scatter(*anchor, marker="*", s=220, color="black", zorder=5, label="reference (KL 0)")
    for method, group in by_method([r for r in runs if r.eval]).items():
        evaluations = [(r, e) for r in group for e in r.evals.values()]
        kl = np.array([e["kl_mean"] for _, e in evaluations])
        reward = np.array([e["reward_mean"] for _, e in evaluations])
        for r, e in evaluations:
            ax.scatter(max(e["kl_mean"], 0.0), e["reward_mean"], color=colour(study, method),
                       marker=MARKERS[r.seed % len(MARKERS)], s=40 if e is r.eval else 16, zorder=4)
        front_kl, front_reward = stats.frontier_curve(kl, reward, anchor)
        ax.plot(front_kl, front_reward, color=colour(study, method), lw=1.5, label=study.arms[method].label)
    ax.set_xlabel("sequence KL(policy ‖ reference), nats (sampled, held-out prompts)")
    ax.set_ylabel("mean VADER reward of samples")
    ax.set_title("Reward–KL frontier (marker shape = seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sparsity_figure(study: StudyPlan, runs: list[RunLog], path: Path) -> bool:
    """Reward- and KL-mask sparsity (% exact zeros) over training steps, one panel per masked method."""
    masked = [r for r in runs if "train/masks/sparsity_reward_chosen" in r.metrics["train"]]
    if not masked:
        return False
    plt = _plt()
    groups = by_method(masked)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), dpi=110, squeeze=False)
    for ax, (method, group) in zip(axes[0], groups.items(), strict=True):
        for r in group:
            for kind, style in (("reward", "-"), ("kl", ":")):
                curve = zeros_curve(r.metrics["train"], kind)
                if curve:
                    ax.plot(*curve, style, lw=1, label=f"{kind} β={r.beta:g} s{r.seed}")
        ax.set_title(study.arms[method].label, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% response tokens with mask exactly 0")
    axes[0][-1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def heatmap_figures(run: RunLog, out: Path, count: int = 3) -> list[Path]:
    from PIL import Image

    from sparsepo_lightning.callbacks.heatmaps import render_pair
    from sparsepo_lightning.study.maskdump import pair_from_record

    paths = []
    for i, row in enumerate(run.masks["pairs"][:count]):
        path = out / f"heatmap_{i}.png"
        Image.fromarray(render_pair(pair_from_record(row))).save(path)
        paths.append(path)
    return paths
