"""``StepCheckpoints``: save the policy's weights at chosen optimizer steps, so a run gives several frontier points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StepCheckpoints(Callback):
    """Write ``<dirpath>/step<N>.ckpt`` (weights only) when the global step reaches each of ``steps``.

    Args:
        dirpath: the folder of the checkpoints.
        steps: optimizer steps to save at (the study evaluates each checkpoint, then deletes it).
    """

    def __init__(self, dirpath: str, steps: Sequence[int]) -> None:
        self.dirpath = Path(dirpath)
        self.steps = sorted(set(int(s) for s in steps))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step in self.steps and not (self.dirpath / f"step{step}.ckpt").is_file():
            trainer.save_checkpoint(self.dirpath / f"step{step}.ckpt", weights_only=True)
