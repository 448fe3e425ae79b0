"""AdamW parameter groups (docs/method.md §1.4) and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

Schedule = Literal["cosine", "linear", "constant"]

SCHEDULES: dict[str, Callable[[Optimizer, int, int], LambdaLR]] = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "constant": lambda optimizer, warmup, _total: get_constant_schedule_with_warmup(optimizer, warmup),
}
"""Schedule name -> ``(optimizer, warmup_steps, total_steps) -> LambdaLR`` (transformers' schedules)."""


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names of biases and of normalisation-layer parameters (LayerNorm, RMSNorm, ...) inside ``module``."""
    names = set()
    for module_name, sub in module.named_modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for param_name, _ in sub.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name.endswith("bias"):
                names.add(full)
    return names


def parameter_groups(policy: nn.Module, masker: nn.Module | None, lr: float, weight_decay: float,
                     mask_weight_decay: float, mask_lr: float | None = None) -> list[dict]:
    """Three AdamW groups: policy weights (``weight_decay``), all biases and norm parameters including the
    masks' (0.0), mask weights (``mask_weight_decay``). Only trainable parameters are included.

    Args:
        mask_lr: learning rate of the mask parameters; None keeps the policy LR (parity with the released
            code, docs/method.md §8.10).
    """
    groups: dict[str, dict] = {
        "policy": {"params": [], "weight_decay": weight_decay, "lr": lr},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr},
        "mask_no_decay": {"params": [], "weight_decay": 0.0, "lr": mask_lr or lr},
        "mask": {"params": [], "weight_decay": mask_weight_decay, "lr": mask_lr or lr},
    }
    for module, decay_key, no_decay_key in ((policy, "policy", "no_decay"), (masker, "mask", "mask_no_decay")):
        if module is None:
            continue
        no_decay = _no_decay_names(module)
        for name, param in module.named_parameters():
            if param.requires_grad:
                groups[no_decay_key if name in no_decay else decay_key]["params"].append(param)
    if mask_lr is None:  # one no-decay group, as in the released code
        groups["no_decay"]["params"] += groups.pop("mask_no_decay")["params"]
    return [dict(group, name=name) for name, group in groups.items() if group["params"]]


def warmup_schedule(optimizer: Optimizer, total_steps: int, warmup_ratio: float, schedule: Schedule) -> LambdaLR:
    """Linear warm-up over ``ceil(warmup_ratio · total_steps)`` optimizer steps, then cosine / linear decay to 0
    or constant: transformers' schedules, as used by the released code (HF Trainer ``warmup_ratio``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    return SCHEDULES[schedule](optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
