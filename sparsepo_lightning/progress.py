"""Progress for output that is not a terminal (SLURM logs, ``nohup``, CI): one plain line every ``every_n_steps``
optimizer steps or ``every_seconds`` seconds, whichever comes first, never wrapped or redrawn::

    step 20/64 (31%) | loss 0.6812 | accuracy 0.625 | margin 0.0412 | mask zeros 2.1% | 1.43 s/step | ETA 1m03s

``sparsepo`` uses it when standard output is not a terminal and the rich bar (``StepProgressBar``) when it is.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

SHOWN = (("loss", "train/loss", "{:.4f}"), ("accuracy", "train/rewards/accuracy", "{:.3f}"),
         ("margin", "train/rewards/margin", "{:.4f}"), ("mask zeros", "train/masks/sparsity_reward_chosen", "{:.1%}"))
"""(label, logged name, format) of the values on each line; those a run does not log are left out."""


class PlainProgress(ProgressBar):
    """One unwrapped line per ``every_n_steps`` optimizer steps or ``every_seconds`` seconds (and the first and the
    last step): step/total, loss, accuracy, margin, mask sparsity, time per step, ETA.

    Args:
        every_n_steps: print at least every this many optimizer steps.
        every_seconds: print when this many seconds passed since the last line, even between those steps.
    """

    def __init__(self, every_n_steps: int = 10, every_seconds: float = 60.0) -> None:
        super().__init__()
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._enabled = True
        self._started = self._last_line = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = self._last_line = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self.is_enabled:
            return
        step, total = trainer.global_step, _total_steps(trainer)
        now = time.monotonic()
        due = (step - self._first_step == 1 or step % self.every_n_steps == 0 or step == total
               or now - self._last_line >= self.every_seconds)
        if due and step > self._first_step:
            self._last_line = now
            sys.stdout.write(self.line(trainer, step, total, (now - self._started) / (step - self._first_step)) + "\n")
            sys.stdout.flush()

    def line(self, trainer: Trainer, step: int, total: int | None, seconds_per_step: float) -> str:
        """The progress line at optimizer step ``step`` (of ``total``, if known)."""
        parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
        metrics = trainer.callback_metrics
        for label, name, form in SHOWN:
            if name in metrics:
                parts.append(f"{label} {form.format(float(metrics[name]))}")
        parts.append(f"{seconds_per_step:.2f} s/step")
        if total:
            parts.append(f"ETA {_duration(seconds_per_step * max(total - step, 0))}")
        return " | ".join(parts)


def _total_steps(trainer: Trainer) -> int | None:
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
