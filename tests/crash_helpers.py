"""Callbacks used by the crash-and-resume test inside a real ``sparsepo fit`` subprocess (imported by class_path)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from lightning.pytorch import Callback

from sparsepo_lightning.checkpointing import RunCheckpoint


class LossJSONL(Callback):
    """Append ``{"step", "batch_idx", "loss"}`` per training batch to a JSONL file, fsynced (survives SIGKILL);
    ``{rank}`` in the path is the process's global rank (one file per rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        line = json.dumps({"step": trainer.global_step, "batch_idx": batch_idx, "loss": float(outputs["loss"])})
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class BlockAtStep(Callback):
    """Before the batch of optimizer step ``step + 1`` starts, write ``marker`` and hang until killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(batch_idx))
            while True:
                time.sleep(1)


class KillBeforeRelink(RunCheckpoint):
    """``RunCheckpoint`` that SIGKILLs its own process when ``last.ckpt`` is about to be re-pointed for the
    ``nth`` time: after the new step checkpoint is written, before the link moves (the window of the old
    delete-then-relink order)."""

    def __init__(self, nth: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nth, self.calls = nth, 0

    def _link_checkpoint(self, trainer, filepath, linkpath) -> None:  # noqa: ANN001
        self.calls += 1
        if self.calls == self.nth:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._link_checkpoint(trainer, filepath, linkpath)


class InternalError(Callback):
    """Raises a plain ``RuntimeError`` when set up: an internal error, which keeps its traceback."""

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        raise RuntimeError("an internal error")


class PauseAtStep(Callback):
    """Before the batch of optimizer step ``step + 1`` starts, write the process id to ``marker`` and wait (at most
    120 s) until the test removes it: the test sends its signal in between, so the step the run is in when signalled
    is known. ``{rank}`` in ``marker`` is the global rank (each rank of a DDP run pauses at its own marker)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            marker = Path(self.marker.format(rank=trainer.global_rank))
            partial = marker.with_name(marker.name + ".partial")
            partial.write_text(str(os.getpid()))
            partial.rename(marker)  # the test never reads a half-written marker
            deadline = time.monotonic() + 120
            while marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
