"""The reference's weights under ``model.reference_cache``: released once the cache serves the fit, loaded again where
a later stage runs the live reference.

With the cache, no step of a fit runs the reference: its training and validation log-probs come from the cache.
Its weights would still take as much memory as the policy's weights (TRL's ``precompute_ref_log_probs`` likewise
keeps no reference model). :func:`release` replaces its parameters with empty ones, in single-device and DDP runs.
Empty, not on the meta device: Lightning moves the module to the CPU when the fit ends, which a meta tensor cannot
do. The buffers (rotary frequencies) are small and stay: DDP broadcasts them at every step. It keeps them in two cases:

- under FSDP2 or FSDP, where each rank holds only its shard and the sharded modules' hooks hold the storage;
- when a callback reads the reference during the fit (a callback class with ``reads_reference = True``, such as
  ``GenerationSamples``, which writes the reference's completions beside the policy's).

:func:`live` returns the reference that a step is about to run. If the weights were released (``trainer.test``
after ``trainer.fit`` in one process, where the test split is not cached), it first loads them again from the
reference's source, with the options the module was built with.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsepo_lightning.models import load_frozen


def release(module: Any, trainer: Any) -> str:
    """Empty ``module.reference``'s parameters where nothing else reads them (see the module docstring); returns
    what was done, in words, for the log ("" when there is no separate reference, or it is released already)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    reference = module.reference
    if reference is None or released(reference):
        return ""
    if module._sharded or not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
        return "reference weights kept: each rank holds its shard"
    readers = sorted({type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "reads_reference", False)})
    if readers:
        return f"reference weights kept: {', '.join(readers)} reads the reference during the fit"
    size = sum(p.numel() * p.element_size() for p in reference.parameters())
    for module_ in reference.modules():  # parameters only: DDP broadcasts every buffer (RoPE's inv_freq) each step
        for name, param in list(module_.named_parameters(recurse=False)):
            setattr(module_, name, nn.Parameter(param.new_empty(0), requires_grad=False))
    reference.sparsepo_released = True
    return f"reference weights released ({size / 2**20:,.0f} MiB): the fit reads the cache"


def released(reference: nn.Module) -> bool:
    """True when :func:`release` emptied ``reference``'s parameters."""
    return getattr(reference, "sparsepo_released", False)


def live(module: Any) -> nn.Module:
    """``module.reference``, its weights loaded again first if :func:`release` emptied them."""
    if released(module.reference):
        hp = module.hparams
        module.reference = load_frozen(hp.get("reference") or hp["model"], hp["dtype"], hp["trust_remote_code"],
                                       disable_dropout=hp["disable_dropout"],
                                       attn_implementation=hp.get("attn_implementation")).to(module.device)
        module._packed_checked = False  # the packed layout's start-up check skipped it: run it again, with it
        # no masker is bound again: a masker bound to the reference's modules reads it live, and the cache refuses
        # those (``reference_cache.check_cacheable``), so none is bound to the released one
    return module.reference
