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
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

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


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar; when ``trainer.max_steps`` bounds the run it counts optimizer steps out of
    the real total (``trainer.estimated_stepping_batches``) instead of showing ``Epoch 0/-2``."""

    def _steps_total(self) -> int | None:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return None
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    def _get_train_description(self, current_epoch: int) -> str:
        if self._steps_total() is None:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}, steps"

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        total = self._steps_total()
        if total is not None and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.reset(self.train_progress_bar_id, total=total, completed=trainer.global_step,
                                description=self._get_train_description(trainer.current_epoch))  # fmt: skip

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._steps_total() is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        return None
