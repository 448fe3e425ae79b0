"""Non-finite guard: skip optimizer steps whose loss or gradients are NaN/inf, stop after too many in a row,
and warn when the reward mask has collapsed to all zeros.

``PreferenceModule.configure_callbacks`` adds one :class:`NonFiniteGuard` to every run (options
``model.max_consecutive_nonfinite`` and ``model.mask_collapse_steps``), so a user's ``trainer.callbacks`` list
cannot drop it by accident.

How a step is skipped under automatic optimization: after backward (and after GradScaler unscaling under
``16-mixed``) Lightning calls ``on_before_optimizer_step``; when any loss of the step or any gradient is
non-finite the guard sets every gradient to ``None``. ``torch.optim`` optimizers skip parameters without a
gradient, so neither the weights nor the optimizer state (moments, step counts) change. The learning-rate
scheduler and ``trainer.global_step`` still advance: a skipped step counts as a step of the schedule. Under
DDP/FSDP the decision is all-reduced (any rank non-finite -> every rank skips), so ranks never diverge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

LIKELY_CAUSES = (
    "Likely causes:\n"
    "  - fp16 overflow: trainer.precision 16-mixed (or model.dtype float16) overflows in attention/logits; use "
    "bf16-mixed or 32-true.\n"
    "  - learning rate too high: lower model.lr (and model.mask_lr), or raise model.warmup_ratio; add "
    "trainer.gradient_clip_val.\n"
    "  - all-zero masks (mask collapse): every reward/KL mask weight is 0, so rewards are 0 and normalised "
    "statistics divide by 0; lower model.objective.init_args.l1_reward / l1_kl.\n"
    "  - a bad batch: empty responses or extreme lengths; check the rows named above and the data report."
)


class NonFiniteTrainingError(RuntimeError):
    """Raised when ``max_consecutive`` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps with a non-finite loss or gradient; count, log and bound them.

    Logged per optimizer step: ``train/nonfinite/skipped_total`` and ``train/nonfinite/consecutive``. Each
    skipped step also produces a warning naming the global step, epoch, batch indices, the data rows (``file:line``
    from ``PreferenceDataModule.train_batch_sources``) and the first parameters with non-finite gradients.

    Args:
        max_consecutive: stop the run (``NonFiniteTrainingError``) after this many skipped steps in a row.
        mask_collapse_steps: warn when the learned reward mask is (almost) entirely 0 (≥ 99 % exact zeros, or a
            mean below 0.01) for this many consecutive training batches.
    """

    def __init__(self, max_consecutive: int = 10, mask_collapse_steps: int = 3) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite={max_consecutive}: must be >= 1 (steps in a row).")
        if mask_collapse_steps < 1:
            raise ValueError(f"mask_collapse_steps={mask_collapse_steps}: must be >= 1 (batches in a row).")
        self.max_consecutive = max_consecutive
        self.mask_collapse_steps = mask_collapse_steps
        self.skipped_total = 0
        self.consecutive = 0
        self.collapsed_batches = 0
        self.skipped_log: list[dict[str, Any]] = []
        """One entry per skipped step (``global_step``, ``reason``, ``batches``); kept for callers and tests."""
        self._losses: list[Tensor] = []
        self._batches: list[dict[str, Any]] = []

    # ---- collect what the step saw ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batches.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "sources": None})

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())

    # ---- decide ------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_bad = bool(self._losses) and not bool(torch.stack([x.float() for x in self._losses]).isfinite().all())
        grad_bad = bool(grads) and not torch.isfinite(_total_norm(grads)).item()
        bad = trainer.strategy.reduce_boolean_decision(loss_bad or grad_bad, all=False)  # any rank -> all ranks
        batches, self._losses, self._batches = self._batches, [], []
        if bad:
            reason = "loss" if loss_bad else "gradient" if grad_bad else "another rank"
            names = _nonfinite_parameters(pl_module, optimizer) if reason == "gradient" else []
            optimizer.zero_grad(set_to_none=True)  # optimizers skip params without grad: no weight/state change
            self.skipped_total += 1
            self.consecutive += 1
            self._report(trainer, reason, batches, names)
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite/skipped_total", float(self.skipped_total), on_step=True, on_epoch=False)
        pl_module.log("train/nonfinite/consecutive", float(self.consecutive), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient (last at global "
                f"step {trainer.global_step}; {self.skipped_total} skipped in total); stopping "
                f"(model.max_consecutive_nonfinite={self.max_consecutive}). The weights were not updated by the "
                f"skipped steps; the last checkpoint is intact.\n{LIKELY_CAUSES}"
            )

    def _report(self, trainer: Trainer, reason: str, batches: list[dict[str, Any]], names: list[str]) -> None:
        sources_of = getattr(trainer.datamodule, "train_batch_sources", None)  # PreferenceDataModule: file:line
        for b in batches:
            b["sources"] = sources_of(b["batch_idx"]) if sources_of is not None else None
        entry = {"global_step": trainer.global_step, "reason": reason, "batches": batches, "parameters": names}
        self.skipped_log.append(entry)
        where = "; ".join(
            f"epoch {b['epoch']} batch {b['batch_idx']}" + (f" rows {', '.join(b['sources'])}" if b["sources"] else "")
            for b in batches
        )
        params = f"; first non-finite gradients: {', '.join(names)}" if names else ""
        rank_zero_warn(
            f"non-finite {reason} at global step {trainer.global_step} ({where}){params}: optimizer step skipped "
            f"({self.consecutive} in a row, {self.skipped_total} in total; the run stops at "
            f"{self.max_consecutive} in a row)."
        )

    # ---- mask collapse -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is None or record.masks is None or not record.masks.learned or record.stage != "train":
            return  # only learned masks can collapse (fixed and selection masks are zero by design)
        collapsed = _reward_mask_collapsed(record.metrics)
        self.collapsed_batches = self.collapsed_batches + 1 if collapsed else 0
        if self.collapsed_batches == self.mask_collapse_steps:
            metrics = record.metrics
            sparsity = max(float(metrics["masks/sparsity_reward_chosen"]),
                           float(metrics["masks/sparsity_reward_rejected"]))
            rank_zero_warn(
                f"mask collapse: the reward mask is (almost) entirely 0 for {self.collapsed_batches} "
                f"training batches in a row (global step {trainer.global_step}: {sparsity:.1f} % of response tokens "
                f"exactly 0, mean mask {float(metrics['masks/mean_reward']):.4f}, largest "
                f"{float(metrics['masks/max_reward']):.4f}). The effective β is then ~0: the reward term and its "
                "gradient vanish, the masks receive no signal except the L1 penalty and weight decay (which push "
                "them further down), and the loss stays at log 2 = 0.693. Cause: a mask start near 0 (LearnedMasker "
                "init: released, N(0, 0.02)), or an L1 penalty / mask learning rate too strong. Fix: "
                "model.masker.init_args.init: ones (every mask starts at 1), lower "
                "model.objective.init_args.l1_reward / l1_kl, or lower model.mask_lr."
            )

    # ---- checkpoint state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive,
                "collapsed_batches": self.collapsed_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.collapsed_batches = int(state_dict.get("collapsed_batches", 0))


COLLAPSE_SPARSITY = 99.0
"""% of exact zeros among response tokens (chosen and rejected) from which a reward mask counts as collapsed."""
COLLAPSE_MEAN = 0.01
"""Mean reward-mask value below which it counts as collapsed: the effective β is under 1 % of the nominal one."""


def _reward_mask_collapsed(metrics: dict[str, Tensor]) -> bool:
    """Whether a batch's reward mask is (almost) entirely 0: ≥ 99 % exact zeros, or a mean value below 0.01."""
    sparsity = [metrics[k] for k in ("masks/sparsity_reward_chosen", "masks/sparsity_reward_rejected") if k in metrics]
    if not sparsity:
        return False
    all_zero = all(float(v) >= COLLAPSE_SPARSITY for v in sparsity)
    mean = metrics.get("masks/mean_reward")
    return all_zero or (mean is not None and float(mean) < COLLAPSE_MEAN)


def _total_norm(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of all gradients: non-finite iff some element is NaN or inf (fp16 grads upcast so large finite
    values cannot overflow the norm)."""
    grads = [g.float() if g.dtype == torch.float16 else g for g in grads]
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)


def _nonfinite_parameters(pl_module: LightningModule, optimizer: Optimizer, limit: int = 5) -> list[str]:
    """Names of the first ``limit`` parameters whose gradient has a NaN/inf (called before the grads are cleared)."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    bad = [names.get(id(p), "?") for group in optimizer.param_groups for p in group["params"]
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    return bad[:limit]
