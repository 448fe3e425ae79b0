"""Interrupts that lose nothing: SIGINT (Ctrl-C), SIGTERM (``kill``, a cluster's time limit or preemption) and
SIGUSR1 (SLURM's requeue signal, ``#SBATCH --signal=SIGUSR1@90``) finish the current optimizer step, then end
training as if ``max_steps`` were reached there: ``RunCheckpoint`` writes ``last.ckpt`` and the run summary is
written. The ``sparsepo`` command then exits with status ``128 + signal number`` (130 SIGINT, 143 SIGTERM,
138 SIGUSR1), and ``--ckpt_path last`` resumes step-exact. A second Ctrl-C stops at once (no checkpoint).

Under DDP/FSDP the ranks agree at each optimizer step (one all-reduce of a flag, only when ``world_size > 1``), so a
signal delivered to any rank stops all of them at the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""The signals that stop training gracefully."""


class GracefulStop(Callback):
    """On SIGINT, SIGTERM or SIGUSR1: stop after the current optimizer step, with a checkpoint and the summary.

    The handlers are installed when training starts and the previous ones restored when it ends. ``received`` is the
    signal number that stopped the run (``None`` if none did); :func:`exit_status` turns it into the exit status.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_before = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Installed here, after Lightning's own handlers (its SIGTERM handler ends the run with status 0 and no
        checkpoint; its SLURM SIGUSR1 handler writes an ``hpc_ckpt`` outside the run's folder)."""
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            sys.stderr.write(f"\nReceived {signal.Signals(signum).name}: finishing the current optimizer step, then "
                             "writing a checkpoint and the run summary (Ctrl-C again stops at once, without them).\n")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step == self._step_before:  # inside a gradient accumulation: not a step boundary
            return
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, whichever received the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop and self.received is None:
                self.received = signal.SIGTERM
        if stop:
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back the handler found at install time, only where ours is still installed: Lightning's own teardown
        may already have restored the handlers from before the fit (and re-installing its handler then would keep it,
        and through it the trainer and the models, alive for the rest of the process)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def exit_status(trainer: Trainer) -> int | None:
    """``128 + signal`` if a :class:`GracefulStop` of ``trainer`` stopped the run (after saying where it stopped and
    how to resume; SIGUSR1 in a SLURM job also requeues it), else ``None``."""
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if stop is None or stop.received is None:
        return None
    name = signal.Signals(stop.received).name
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "(no checkpoint callback)"
    rank_zero_info(f"Interrupted by {name} at step {trainer.global_step}: checkpoint {checkpoint}. Resume with the "
                   f"same command plus --ckpt_path last (exit status {128 + stop.received}).")
    job = os.environ.get("SLURM_JOB_ID")
    if stop.received == signal.SIGUSR1 and job and trainer.is_global_zero:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
        done = subprocess.call(["scontrol", "requeue", job])
        rank_zero_info(f"SLURM job {job} " + ("requeued." if done == 0 else f"not requeued (scontrol: {done})."))
    return 128 + stop.received
