"""Crash-safe checkpoints: atomic writes, ``weights_only`` loads, ``--ckpt_path last`` across run versions,
and no silent reuse of a non-empty checkpoint directory.

The CLI uses both by default (``cli.TRAINER_DEFAULTS``)::

    trainer:
      plugins: sparsepo_lightning.checkpointing.AtomicCheckpointIO
      callbacks:
        - class_path: sparsepo_lightning.checkpointing.RunCheckpoint
          init_args: {save_last: true, every_n_train_steps: 200}   # + at every epoch end and at the end

Resume after a crash or pre-emption with ``sparsepo fit --config <same config> --ckpt_path last``: the newest
``last.ckpt`` of the run's previous versions (``runs/<name>/version_*/checkpoints``) is found, weights, optimizer,
scheduler, loop counters and the data order (mid-epoch included) are restored, and the resumed run writes to a
new version directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from sparsepo_lightning.errors import OutputExistsError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target directory, ``fsync``, then ``os.replace``.

    A crash (SIGKILL, power loss, full disk) during a write leaves the previous ``last.ckpt`` intact and at most a
    stray ``.<name>.*.tmp`` file; a reader never sees a half-written checkpoint. Loads use ``weights_only=True``
    unless the caller passes ``False`` explicitly: a checkpoint is data, never code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, umask_mode(0o666))  # mkstemp creates it owner-only; a checkpoint is meant to be shared
            os.replace(tmp, path)  # atomic on POSIX and Windows within one file system
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)  # make the rename itself durable

    def load_checkpoint(self, path: _PATH, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def umask_mode(mode: int) -> int:
    """``mode`` (``0o666`` for a file, ``0o777`` for a folder) as the process's umask allows, i.e. the mode a plain
    ``open``/``mkdir`` would give: ``tempfile.mkstemp``/``mkdtemp`` create owner-only files and folders, which
    teammates on a shared cluster could not read."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never overwrites another run's checkpoints and resumes ``last`` across versions.

    - ``ckpt_path="last"`` first looks in this run's directory, then in the sibling version directories of the
      logger (``runs/<name>/version_*/checkpoints/last*.ckpt``, newest file wins): with a versioned logger each
      run has a fresh directory, where plain ``ModelCheckpoint`` finds nothing and silently starts from scratch.
    - Besides ``every_n_train_steps``, it also saves at every epoch end and when training stops, so ``last.ckpt``
      always holds the final state.
    - Fitting into a checkpoint directory that already holds files is an error, unless the run resumes from a
      checkpoint inside that directory (continuing the same run) or ``overwrite=True``.
    - With ``save_last="link"`` the link is re-pointed atomically (a new link under a temporary name, renamed over
      ``last.ckpt``) and the previous step checkpoint is deleted only afterwards, so a kill at any moment leaves
      ``last.ckpt`` pointing at a complete checkpoint (Lightning deletes the old file first, then removes and
      re-creates the link: a kill in between leaves a broken link that ``--ckpt_path last`` cannot use).

    Args:
        overwrite: allow writing into a non-empty checkpoint directory (files with the same names are replaced).
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``save_last``, ``every_n_train_steps``, ...).
    """

    def __init__(self, *args: Any, overwrite: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overwrite = overwrite
        self._user_dirpath = self.dirpath  # None when the directory follows the logger's version
        self._existing_files: list[str] = []
        self._pending_removals: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        directory = Path(self.dirpath) if self.dirpath else None
        self._existing_files = sorted(p.name for p in directory.iterdir()) if directory and directory.is_dir() else []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse to overwrite (checked once the resume path is known, before anything is written)."""
        super().on_train_start(trainer, pl_module)
        if not self._existing_files or self.overwrite or self.save_top_k == 0 and not self.save_last:
            return
        here = Path(self.dirpath).resolve()
        resumed = trainer.ckpt_path is not None and Path(trainer.ckpt_path).resolve().parent == here
        if not resumed:
            shown = ", ".join(self._existing_files[:3]) + (" ..." if len(self._existing_files) > 3 else "")
            raise OutputExistsError(
                f"checkpoint directory {self.dirpath} already holds files ({shown}) from another run; this run would "
                "overwrite them. Fix: resume that run with --ckpt_path last (or a path inside it), choose another "
                "directory (ModelCheckpoint dirpath, or a new logger version), or set "
                "RunCheckpoint(overwrite=true) to replace them."
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_now(trainer)

    def _save_now(self, trainer: Trainer) -> None:
        """Also checkpoint at every epoch end and when training stops (``every_n_train_steps`` alone does not), so
        ``last.ckpt`` always holds the final state."""
        if not (self.save_last or self.save_top_k) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Say what a resume restores (instead of Lightning's generic "dataloader is not resumable" warning, which
        the CLI silences: the data module saves its place in the pass)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer.state.fn != "fit":
            return
        datamodule = trainer.datamodule
        data = checkpoint.get(type(datamodule).__qualname__, {}) if datamodule is not None else {}
        step = checkpoint.get("global_step", 0)
        restored = "weights, masks, optimizer, learning-rate schedule and loop counters are restored"
        if not data or data.get("train_pass_complete", True):
            where = "at an epoch boundary; the next pass starts as in an uninterrupted run"
        else:
            where = (f"mid-epoch, after {data.get('train_batches_done')} batches of pass {data.get('train_passes')}; "
                     "the pass continues with the next batch of the same order, exactly as an uninterrupted run")
        rank_zero_info(f"Resuming at step {step}: {restored}; {where}.")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run writes into its own version folder on purpose: from another folder only ``best_model_path``
        is restored (as Lightning does), without Lightning's "dirpath has changed" warning."""
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
        else:
            self.best_model_path = state_dict["best_model_path"]

    def _link_checkpoint(self, trainer: Trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        """Point ``linkpath`` at ``filepath`` atomically: a new link under a temporary name, renamed over it."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            directory = os.path.dirname(linkpath)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):  # a copied sharded folder of an old run
                shutil.rmtree(linkpath)
            tmp = os.path.join(directory, f".{os.path.basename(linkpath)}.{os.getpid()}.link.tmp")
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, directory), tmp)
            except OSError:  # no symlinks (Windows without the privilege): a copy, as Lightning does
                shutil.copy(filepath, tmp)
            os.replace(tmp, linkpath)
            _fsync_directory(Path(directory))
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if self.save_last == "link":  # deleted after last.ckpt points at the new checkpoint
            self._pending_removals.append(filepath)
        else:
            super()._remove_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        pending, self._pending_removals = self._pending_removals, []
        for filepath in pending:
            if os.path.abspath(filepath) != os.path.abspath(self.last_model_path or ""):
                super()._remove_checkpoint(trainer, filepath)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if found or self._user_dirpath is not None or trainer.logger is None or not trainer.logger.log_dir:
            return found
        runs = Path(trainer.logger.log_dir).parent  # runs/<name>; siblings are version_0, version_1, ...
        # exists(): a sharded checkpoint is a folder (or a link to one)
        previous = {os.path.normpath(p) for p in runs.glob("*/checkpoints/last*.ckpt") if p.exists()}
        if previous:
            newest = max(previous, key=os.path.getmtime)
            rank_zero_info(f"--ckpt_path last: resuming from {newest} (the newest last checkpoint under {runs}).")
        return previous


OBJECTIVE_STATE = "objective_state"
"""Checkpoint key of the objective's state (``Objective.state_dict``; BCO's reward shift), beside ``state_dict``."""


class _StatefulObjective(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...


def save_module_state(checkpoint: dict[str, Any], objective: _StatefulObjective, frozen_keys: set[str],
                      strategy: Strategy | None) -> None:
    """``PreferenceModule.on_save_checkpoint``: add the objective's state (if any) under :data:`OBJECTIVE_STATE`,
    and drop what is rebuilt from its source on load: the reference, and with LoRA the frozen base weights
    (``frozen_keys``). Except under ``FSDPStrategy`` (FSDP1): its flat-parameter units (frozen and trainable weights
    together) insist on every key when loading, so FSDP1 checkpoints keep the frozen weights (sharded, 1/N per rank)."""
    if state := objective.state_dict():
        checkpoint[OBJECTIVE_STATE] = state
    if isinstance(strategy, FSDPStrategy):
        return
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen_keys}


def load_module_state(checkpoint: dict[str, Any], objective: _StatefulObjective, frozen_keys: set[str],
                      own_state: Any) -> None:
    """``PreferenceModule.on_load_checkpoint``: restore the objective's state, close an epoch the checkpoint was
    written at the end of (:func:`close_saved_epoch`, before Lightning restores its loops from it), and put the
    module's own frozen weights (``own_state()``: its ``state_dict``) back under ``frozen_keys`` so loading stays
    strict for everything that was saved. A distributed checkpoint has no ``state_dict`` here: the strategy has loaded
    the weights already."""
    objective.load_state_dict(checkpoint.get(OBJECTIVE_STATE))
    close_saved_epoch(checkpoint)
    if "state_dict" not in checkpoint:
        return
    own = own_state()
    checkpoint["state_dict"].update({k: own[k] for k in frozen_keys if k in own})


def close_saved_epoch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written at an epoch's end resume at the first batch of the next pass, as the uninterrupted
    run goes on: mark the epoch completed and its batch counters as those of a new epoch.

    Two states need it: written in ``on_train_epoch_end`` (the epoch is processed but not yet completed: RunCheckpoint's
    epoch saves) and written after the epoch completed but before the next one started (``on_train_end``, or
    ``trainer.save_checkpoint`` after a fit that stopped at an epoch end). Lightning 2.6 resumes the first as a new
    epoch only when training is bounded by epochs, and the second never: bounded by ``max_steps`` it restarts with
    the finished epoch's batch count, trains one batch of the next pass, then starts a pass in the order of the pass
    after. The data module's own state already says that its pass is complete.

    A checkpoint written at the end of a run stopped mid-pass (the data module's ``train_pass_complete`` is false)
    is reopened instead (:func:`_reopen_stopped_epoch`)."""
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops or "epoch_progress" not in loops or "epoch_loop.batch_progress" not in loops:
        return
    epochs = [c for c in loops["epoch_progress"].values() if isinstance(c, dict)]
    at_end = all(c["ready"] == c["started"] == c["processed"] == c["completed"] + 1 for c in epochs)
    ended = all(c["ready"] == c["started"] == c["processed"] == c["completed"] for c in epochs)
    after_end = ended and loops["epoch_loop.batch_progress"].get("is_last_batch", False)
    data = [v for v in checkpoint.values() if isinstance(v, dict) and "train_pass_complete" in v]
    if data and not data[0]["train_pass_complete"] and (at_end or ended):
        _reopen_stopped_epoch(epochs)
        return
    if not (at_end or after_end):
        return
    for counts in epochs:
        counts["completed"] = counts["processed"]
    for name in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
        if name in loops:
            loops[name]["current"] = dict.fromkeys(loops[name]["current"], 0)
            if "is_last_batch" in loops[name]:
                loops[name]["is_last_batch"] = False


def _reopen_stopped_epoch(epochs: list[dict[str, int]]) -> None:
    """A run stopped mid-pass (``max_steps`` reached, or a signal: :mod:`sparsepo_lightning.interrupt`) ends its
    epoch in Lightning's loops although the data module's pass is not complete. Mark that epoch as started but not
    processed, as in a checkpoint written mid-epoch, so that the resumed run continues it: the same epoch number,
    batch index and validation schedule (``val_check_interval``) as the uninterrupted run."""
    for counts in epochs:
        counts["completed"] = counts["processed"] = counts["started"] - 1
