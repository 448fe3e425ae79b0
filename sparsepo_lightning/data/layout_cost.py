"""``data.layout: auto``: per micro-batch, the layout (padded, or packed with a row bound) of least estimated work.

Packing saves positions (each prompt once, no padding) but, with a dense 4D mask (``sdpa``, ``eager``), every query
of a packed row is scored against every key of the row, where the padded layout's causal kernel scores only its
prefix. Whether it pays depends on the micro-batch. The estimate, in units of one position's linear work (the
projections and the MLP of a block; the LM head runs on the same response tokens in both layouts and is left out)::

    padded:  2B·T        + r · 2B · T(T+1)/2        (2B rows of the longest row T; causal: a query sees its prefix)
    packed:  R·L         + r · R · L²               (R rows of length L; dense mask: a query sees its whole row)

with ``r`` the work of one (query, key) pair over one position's linear work (:func:`attention_ratio`: ``4d`` over
``2(2d² + 2d·d_kv + 3d·d_ff)`` FLOPs for a Llama block; 3.3e-4 for SmolLM2-135M, so attention over 3,000 keys costs
as much as the rest of the block). It reproduces what was measured at full depth on a CPU: 4 pairs of 896 packed
tokens (T = 512) in one row cost 1.75× padded by the estimate (1.61× measured), in rows of one pair 1.04×
(1.02–1.04× measured).

The candidates are the padded layout and packed rows bounded by 1, 2 and 4 times the longest pair segment (never
unbounded rows; ``pack_length`` caps the bound), kept only when their positions stay within the padded layout's
(memory never exceeds it); the cheapest wins, ties go to padded. FlexAttention's block skipping (``flex_attention``)
would make packed rows cheaper than this estimate: ``auto`` then only leaves some saving unused, it never loses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sparsepo_lightning.data.collate import collate_pairs
from sparsepo_lightning.data.collate_packed import collate_packed, first_fit, segment_length
from sparsepo_lightning.types import PreferenceBatch

SMOLLM2_RATIO = 4 * 576 / (2 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536))
"""``attention_ratio`` of SmolLM2-135M (d 576, 3 KV heads of 64, d_ff 1536): the default when no config is found."""
BOUNDS = (1, 2, 4)
"""Packed row bounds tried, in multiples of the micro-batch's longest pair segment."""
PADDED = "padded"


def attention_ratio(config: Any) -> float:
    """Work (FLOPs) of one (query, key) attention pair over the linear work of one position in a decoder block:
    ``4d / 2(2d² + 2d·d_kv + m·d·d_ff)`` (scores and values: ``2·2d``; q and o: ``2d²``; k and v: ``2d·d_kv``;
    the MLP: ``m = 3`` matrices when gated, as Llama's with ``intermediate_size``, else 2 of ``4d``)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    d_kv = d * (getattr(config, "num_key_value_heads", None) or heads) // heads
    d_ff = getattr(config, "intermediate_size", None)
    matrices = 3 if d_ff else 2
    linear = 2 * (2 * d * d + 2 * d * d_kv + matrices * d * (d_ff or 4 * d))
    return 4 * d / linear


def ratio_for(model: str | None) -> float:
    """``attention_ratio`` of the model's config (read from its folder or the hub cache), else SmolLM2-135M's."""
    if model is None:
        return SMOLLM2_RATIO
    try:
        from transformers import AutoConfig

        from sparsepo_lightning.model_sources import resolve_model_path

        return attention_ratio(AutoConfig.from_pretrained(resolve_model_path(model)))
    except (OSError, ValueError, AttributeError, ImportError):
        return SMOLLM2_RATIO


def padded_work(rows: int, longest: int, ratio: float) -> float:
    """Estimated work of ``rows`` padded rows of ``longest`` tokens (causal kernel)."""
    return rows * longest + ratio * rows * longest * (longest + 1) / 2


def packed_work(segments: Sequence[int], bound: int | None, ratio: float) -> tuple[float, int]:
    """``(estimated work, positions)`` of the pair segments packed first-fit in rows of at most ``bound`` tokens."""
    fills: list[int] = []  # tokens per row, as collate_packed places them
    for size in segments:
        first_fit(fills, size, bound)
    rows, length = len(fills), max(fills)
    return rows * length + ratio * rows * length**2, rows * length


def choose_layout(features: Sequence[Mapping[str, Sequence[int]]], ratio: float,
                  pack_length: int | None = None) -> str | int:
    """``"padded"``, or the row bound of the packed layout of least estimated work for this micro-batch."""
    longest = max(max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in features)
    best, best_work = PADDED, padded_work(2 * len(features), longest, ratio)
    positions = 2 * len(features) * longest
    segments = [segment_length(f) for f in features]
    for bound in dict.fromkeys(min(k * max(segments), pack_length or k * max(segments)) for k in BOUNDS):
        work, used = packed_work(segments, bound, ratio)
        if used <= positions and work < best_work:
            best, best_work = bound, work
    return best


def collate_auto(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, ratio: float,
                 pack_length: int | None = None) -> PreferenceBatch:
    """``collate_pairs`` or ``collate_packed`` with the row bound :func:`choose_layout` picks."""
    choice = choose_layout(features, ratio, pack_length)
    if choice == PADDED:
        return collate_pairs(features, pad_token_id)
    return collate_packed(features, pad_token_id, pack_length=int(choice))


def auto_collate(pad_token_id: int, pack_length: int | None, model: str | None) -> functools.partial:
    """The collate function of ``data.layout: auto`` for the model named ``model``."""
    return functools.partial(collate_auto, pad_token_id=pad_token_id, ratio=ratio_for(model), pack_length=pack_length)
