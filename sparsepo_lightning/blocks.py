"""The decoder blocks of a Hugging Face causal LM: one definition for everything that needs them (activation-mask
hooks, FSDP2 sharding, activation checkpointing)."""

from __future__ import annotations

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The L decoder blocks of a HF causal LM (or of a PEFT / checkpoint wrapper around one), in order.

    Found by the class names in ``model._no_split_modules`` (what HF itself uses for device maps) when that gives
    exactly ``config.num_hidden_layers`` modules; otherwise as the ``nn.ModuleList`` of ``config.num_hidden_layers``
    entries inside ``model.base_model`` (``layers`` in Llama/NeoX, ``h`` in GPT-2/GPT-J); a model without that
    config field falls back to its longest ``nn.ModuleList``. So activation hooks and sharding always see the
    same blocks, also on models whose ``_no_split_modules`` names other classes too.

    Raises:
        ValueError: no candidate has the expected number of blocks.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    names = set(getattr(model, "_no_split_modules", None) or ())
    by_class = [m for m in model.modules() if type(m).__name__ in names]
    if by_class and (expected is None or len(by_class) == expected):
        return by_class
    body = getattr(model, "base_model", model)
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and (expected is None or len(m) == expected)]
    if lists:
        return list(lists[0] if expected is not None else max(lists, key=len))
    wanted = f"{expected} decoder blocks" if expected is not None else "decoder blocks"
    raise ValueError(f"{type(model).__name__}: could not find its {wanted} (neither `_no_split_modules` classes "
                     "nor an nn.ModuleList of that length).")
