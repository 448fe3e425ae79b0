"""Interrupts that lose nothing: SIGINT (Ctrl-C), SIGTERM (``kill``, a cluster's time limit or preemption) and
SIGUSR1 (SLURM's requeue signal, ``#SBATCH --signal=SIGUSR1@90``) finish the current optimizer step, then end
training as if ``max_steps`` were reached there: ``RunCheckpoint`` writes ``last.ckpt`` and the run summary is
written. The ``sparsepo`` command then exits with status ``128 + signal number`` (130 SIGINT, 143 SIGTERM,
138 SIGUSR1), and ``--ckpt_path last`` resumes step-exact. A second Ctrl-C stops at once (no checkpoint).

Under DDP/FSDP the ranks agree at each optimizer step (one all-reduce of the received signal number, only when
``world_size > 1``), so a signal delivered to any rank stops all of them at the same step, and every rank reports that
signal (the highest number if ranks received different ones). When Lightning itself started the other ranks
(``--trainer.devices N`` without ``torchrun`` or ``srun``), the ``sparsepo`` command (rank 0) exits only once they have
ended: Lightning's watcher of those processes would otherwise kill rank 0 as soon as another rank exits with a
non-zero status, possibly before it has written the summary or requeued the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""The signals that stop training gracefully."""


class GracefulStop(Callback):
    """On SIGINT, SIGTERM or SIGUSR1: stop after the current optimizer step, with a checkpoint and the summary.

    The handlers are installed when training starts and the previous ones restored when it ends. ``received`` is the
    signal number that stopped the run (``None`` if none did); :func:`exit_status` turns it into the exit status.
    ``children`` are the rank processes Lightning's launcher started from this one, once the run is stopping.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.children: list[subprocess.Popen] = []
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
        received = self.received or 0
        if trainer.world_size > 1:  # every rank stops at the same step, whichever received the signal
            number = torch.tensor(received, device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(number, reduce_op="max"))
        if received:
            self.received = received
            trainer.should_stop = True
            self.stopped_at = trainer.global_step
            self.children += _take_children(trainer)  # again (under min_steps): none left

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


def _take_children(trainer: Trainer) -> list[subprocess.Popen]:
    """The rank processes that Lightning's launcher started from this process (rank 0 of a ``--trainer.devices N``
    run; none under ``torchrun``, ``srun`` or on other ranks), taken from the list its watcher thread reads.

    That watcher SIGKILLs rank 0 once another rank has exited with a non-zero status; interrupted ranks exit with
    ``128 + signal``, so it would kill rank 0 while rank 0 still writes the summary. Taken before any rank can
    exit (the checkpoint written next ends with a barrier), they are waited for by :func:`exit_status` instead."""
    procs = getattr(trainer.strategy.launcher, "procs", None)
    if not isinstance(procs, list):
        return []
    taken = list(procs)
    procs.clear()
    return taken


def _wait_for_children(children: list[subprocess.Popen], timeout: float = 120.0) -> None:
    """Wait for the other ranks to end (they stop at the same step); kill one that outlives ``timeout`` seconds."""
    for proc in children:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rank_zero_info(f"Rank process {proc.pid} still runs {timeout:.0f} s after the stop: killing it.")
            proc.kill()
            proc.wait()


def exit_status(trainer: Trainer) -> int | None:
    """``128 + signal`` if a :class:`GracefulStop` of ``trainer`` stopped the run (after saying where it stopped and
    how to resume, and once the rank processes that Lightning started from this one have ended; SIGUSR1 in a SLURM
    job also requeues it), else ``None``."""
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if stop is None or stop.received is None:
        return None
    _wait_for_children(stop.children or _take_children(trainer))  # the latter: a signal after the last step
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
