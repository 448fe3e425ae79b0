"""Run identity: which checkpoints belong to the same experiment.

A run's identity is a hash of its resolved configuration minus what may change when it is resumed: step and epoch
limits, output and checkpoint paths, devices and strategy, logging, progress and validation frequency (see
:data:`SETTINGS`). Every checkpoint written by ``sparsepo fit`` stores it (:class:`RunIdentity`, key
:data:`CHECKPOINT_KEY`, with the settings it hashes), so that

- ``--ckpt_path last`` resumes the newest checkpoint *of the same identity* (another experiment that logs under the
  same name is skipped, and said so), and refuses with the fix when only other runs' checkpoints exist;
- resuming a checkpoint of another identity is an error naming the settings that differ, unless
  ``--resume_anyway``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

CHECKPOINT_KEY = "run_identity"
"""Checkpoint key: ``{"hash": str, "settings": {dotted key: value}}``."""

SETTINGS = ("seed_everything", "model.", "data.", "trainer.precision", "trainer.accumulate_grad_batches",
            "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "trainer.deterministic")
"""The resolved settings (dotted keys, or prefixes ending in ``.``) that make a run's identity: what shapes the
training trajectory. Everything else (``trainer.max_steps``, ``max_epochs``, ``devices``, ``strategy``, ``logger``,
``callbacks``, ``val_check_interval``, ``ckpt_path``, ...) may change on resume."""

EXCLUDED = ("model.gradient_checkpointing", "model.activation_checkpointing", "model.attn_implementation",
            "model.chunk_size", "model.max_consecutive_nonfinite", "model.mask_collapse_steps", "model.meta_init",
            "data.init_args.num_workers", "data.init_args.num_proc", "data.init_args.cache_tokenised",
            "data.init_args.test_file", "data.init_args.strict")
"""Settings under :data:`SETTINGS` that do not change the trajectory (memory, speed, watchdogs, the test split)."""


def identity_settings(config: Any) -> dict[str, Any]:
    """The settings of a resolved config (a jsonargparse ``Namespace`` or a nested dict) that make its identity, as
    ``{dotted key: JSON-compatible value}``."""
    nested = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = json.loads(json.dumps(value, default=str))

    walk("", nested)
    return {key: value for key, value in sorted(flat.items())
            if any(key == s or s.endswith(".") and key.startswith(s) for s in SETTINGS)
            and not any(key == e or key.startswith(e + ".") for e in EXCLUDED)}


def identity_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of :func:`identity_settings`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 4) -> str:
    """``key: saved -> current`` for the first ``limit`` settings that differ (``(unset)`` where one lacks it)."""
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k, "(unset)") != current.get(k, "(unset)"))
    shown = [f"{k}: {_short(saved.get(k, '(unset)'))} -> {_short(current.get(k, '(unset)'))}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def read_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The identity stored in a checkpoint file (or a sharded checkpoint folder's ``meta.pt``), without loading its
    tensors (``mmap``); ``None`` for a checkpoint written without one."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return None
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, ValueError):  # e.g. a legacy (non-zip) file cannot be memory-mapped
        saved = torch.load(path, map_location="cpu", weights_only=True)
    found = saved.get(CHECKPOINT_KEY) if isinstance(saved, dict) else None
    if isinstance(found, dict) and "hash" in found:
        return {**found, "global_step": saved.get("global_step")}
    return None


class RunIdentity(Callback):
    """Stores the run identity (``{"hash", "settings"}``) in every checkpoint, under :data:`CHECKPOINT_KEY`.

    Args:
        settings: :func:`identity_settings` of the run's resolved config.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.hash = identity_hash(settings)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"hash": self.hash, "settings": self.settings}


def choose_last(candidates: list[str], settings: dict[str, Any], resume_anyway: bool = False) -> str:
    """``--ckpt_path last``: the newest of ``candidates`` (oldest first) whose identity is this run's; says which and
    why. Only other runs' checkpoints: a :class:`ConfigError` with the fix, or with ``resume_anyway`` the newest."""
    from lightning.pytorch.utilities import rank_zero_info

    from sparsepo_lightning.errors import ConfigError

    digest = identity_hash(settings)
    others: list[tuple[str, dict[str, Any] | None]] = []
    for path in reversed(candidates):
        saved = read_identity(path)
        if saved is not None and saved["hash"] == digest:
            skipped = f"; skipped {len(others)} newer checkpoint(s) of other runs: {others[0][0]}" if others else ""
            rank_zero_info(f"--ckpt_path last: resuming from {path} (step {saved.get('global_step')}), the newest "
                           f"checkpoint of this run (run identity {digest}: the same model, objective, masker, data "
                           f"and optimisation settings){skipped}.")
            return path
        others.append((path, saved))
    newest, saved = others[0]
    why = differences(saved["settings"], settings) if saved else "written without a run identity (older version)"
    if resume_anyway:
        rank_zero_info(f"--ckpt_path last: resuming from {newest} although it belongs to another run "
                       f"(--resume_anyway; {why}).")
        return newest
    raise ConfigError(
        f"--ckpt_path last: the {len(others)} last checkpoint(s) found belong to other runs, none to this "
        f"configuration (run identity {digest}); the newest, {newest}, differs in {why}. Fix: resume with the "
        "configuration that wrote it, drop --ckpt_path to start this run from scratch (a new version folder), or add "
        "--resume_anyway to continue that checkpoint with this configuration.")


def check_resume(path: str, settings: dict[str, Any], resume_anyway: bool = False) -> None:
    """``fit --ckpt_path PATH``: an error naming what differs when the checkpoint belongs to another run (a checkpoint
    written without an identity is accepted), unless ``resume_anyway``."""
    from sparsepo_lightning.errors import ConfigError

    saved = read_identity(path)
    if saved is None or resume_anyway or saved["hash"] == identity_hash(settings):
        return
    raise ConfigError(
        f"--ckpt_path {path} was written by another run (run identity {saved['hash']}, this configuration's is "
        f"{identity_hash(settings)}); it differs in {differences(saved['settings'], settings)}. Fix: resume with the "
        "configuration that wrote it, or add --resume_anyway to continue it with this configuration (weights, "
        "optimizer and loop counters load; the new settings apply from its step on).")
