"""A count-weighted running mean kept as tensors: BCO's reward shift δ (``objectives.BCO``).

It lives on the objective, not in the LightningModule's ``state_dict``: no precision plugin casts it (``bf16-true``
would round a buffer), no DDP buffer broadcast touches it, and checkpoints carry it under their own key
(``checkpointing.OBJECTIVE_STATE``). Every update is one ``all_reduce`` of ``(Σ values, count)`` over the default
process group when ``torch.distributed`` is initialised, so all ranks hold the same mean; no value leaves the
device (no ``.item()``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class RunningMean:
    """Mean of every finite value passed to :meth:`update` so far (on all ranks), float32, 0 before the first.

    ``mean_n = mean_{n-1} + (Σ batch − count_batch · mean_{n-1}) / (count_{n-1} + count_batch)``: the mean of all
    values seen, each counted once, updated without keeping their sum (whose float32 rounding would grow with it).
    The count is an int64 tensor. Non-finite values (a batch whose optimizer step the ``NonFiniteGuard`` skips) are
    left out, so one bad batch cannot turn the mean into NaN for the rest of the run.
    """

    def __init__(self) -> None:
        self.mean = torch.zeros((), dtype=torch.float32)
        self.count = torch.zeros((), dtype=torch.int64)

    def value(self, like: Tensor) -> Tensor:
        """The current mean, a float32 scalar on the device of ``like`` (the state follows it there)."""
        self._to(like.device)
        return self.mean

    def update(self, values: Tensor) -> Tensor:
        """Add this rank's ``values`` (any shape; detached, in float32) and, under ``torch.distributed``, those of
        every other rank's call (a collective: all ranks must call it together). Returns the new mean."""
        values = values.detach().float().flatten()
        self._to(values.device)
        finite = torch.isfinite(values)
        batch = torch.stack([torch.where(finite, values, 0.0).sum(), finite.sum().float()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)  # SUM: (Σ values, count) over all ranks
        total, count = batch.unbind()
        new_count = self.count + count.round().long()
        self.mean = self.mean + (total - count * self.mean) / new_count.clamp(min=1).float()
        self.count = new_count
        return self.mean

    def state_dict(self) -> dict[str, Tensor]:
        """``{"mean", "count"}`` as CPU tensors (checkpoints load with ``weights_only`` on any machine)."""
        return {"mean": self.mean.detach().cpu().clone(), "count": self.count.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.mean.device
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float32).reshape(()).to(device)
        self.count = torch.as_tensor(state["count"], dtype=torch.int64).reshape(()).to(device)

    def _to(self, device: torch.device) -> None:
        if self.mean.device != device:
            self.mean, self.count = self.mean.to(device), self.count.to(device)
