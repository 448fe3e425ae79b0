"""Tokenise a split's validated items into features, in this process or in ``num_proc`` worker processes
(``datasets.Dataset.map``), with the same data report either way.

Each row is tokenised inside a ``try``; its outcome, features or the error it raised, comes back to the caller, which
accounts the rows in their order: truncation counters summed, rows whose responses end up empty or whose spans cannot
be placed counted as rejected with their location and message (or, with ``strict``, the first one raised), any
other error raised. Workers receive the items and send the outcomes back pickled, so any item type and any
``tokenize_fn`` a data module defines (pairs, unpaired examples) goes through unchanged.
"""

from __future__ import annotations

import functools
import pickle
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sparsepo_lightning.data.rows import DataReport, RowIssue
from sparsepo_lightning.data.tokenize import EmptyResponseError, SpanError

Features = dict[str, Any]
Outcome = tuple[Features | None, Exception | None]


def tokenize_items(dm: Any, items: Sequence[Any], report: DataReport) -> tuple[list[Features], list[str]]:
    """Tokenise validated items (pairs or unpaired examples) with ``dm.tokenize_fn``: ``(features, sources)``.

    Args:
        dm: the data module; its ``tokenize_fn``, ``tokenizer``, ``max_length``, ``max_prompt_length``,
            ``use_chat_template``, ``add_bos``, ``prompt_variants`` (if any), ``strict`` and ``num_proc`` are used.
        items: the split's validated items, each with a ``source`` (row location).
        report: the split's report: truncations and rejected rows are added to it.

    Returns:
        The features of the kept items (without the ``prompt_truncated``/``response_truncated`` counters) and their
        row locations, in item order.

    Raises:
        EmptyResponseError, SpanError: with ``dm.strict``, the first row (in item order) that failed so.
        Exception: any other error ``tokenize_fn`` raised, for the first row that raised one.
    """
    options = (dm.tokenize_fn, dm.tokenizer, dm.max_length, dm.max_prompt_length, dm.use_chat_template, dm.add_bos,
               getattr(dm, "prompt_variants", None))
    num_proc = min(dm.num_proc or 1, len(items))
    # in one process lazily: the first fatal error stops the tokenisation, as before
    outcomes = _map(items, options, num_proc) if num_proc > 1 else (_tokenize_one(item, *options) for item in items)
    features, sources = [], []
    report.prompt_variants = sorted(getattr(dm, "prompt_variants", None) or ())
    for item, (feature, error) in zip(items, outcomes, strict=True):
        if error is not None:
            if dm.strict or not isinstance(error, (EmptyResponseError, SpanError)):
                raise error
            report.reject(RowIssue(error.reason, item.source, None, str(error)))
            continue
        report.prompts_truncated += feature.pop("prompt_truncated")
        report.responses_truncated += feature.pop("response_truncated")
        report.variant_prompts_truncated += feature.pop("variant_prompt_truncated", 0)
        features.append(feature)
        sources.append(item.source)
    return features, sources


def _tokenize_one(item: Any, tokenize: Callable[..., Features], tokenizer: Any, max_length: int,
                  max_prompt_length: int, use_chat_template: bool, add_bos: bool | None,
                  prompt_variants: dict[str, str] | None = None) -> Outcome:
    """``(features, None)``, or ``(None, error)`` when tokenising the item raised (accounted by the caller)."""
    variants = {"prompt_variants": prompt_variants} if prompt_variants else {}
    try:
        return tokenize(item, tokenizer, max_length, max_prompt_length, use_chat_template, add_bos=add_bos,
                        **variants), None
    except Exception as error:  # noqa: BLE001 - tokenize_items raises or counts it, in row order
        return None, error


def _tokenize_batch(batch: dict[str, list[bytes]], options: tuple[Any, ...]) -> dict[str, list[bytes]]:
    """The ``Dataset.map`` function: pickled items in, pickled ``_tokenize_one`` outcomes out."""
    out = []
    for blob in batch["item"]:
        features, error = _tokenize_one(pickle.loads(blob), *options)
        try:
            out.append(pickle.dumps((features, error)))
        except (pickle.PicklingError, TypeError, AttributeError):
            if error is None:
                raise
            raise error from None  # an error that cannot travel back is raised here (datasets re-raises it)
    return {"outcome": out}


def _map(items: Sequence[Any], options: tuple[Any, ...], num_proc: int) -> Iterator[Outcome]:
    """``_tokenize_one`` over ``items`` in ``num_proc`` processes (``datasets.Dataset.map``), in item order."""
    import datasets

    table = datasets.Dataset.from_dict({"item": [pickle.dumps(item) for item in items]})
    mapped = table.map(functools.partial(_tokenize_batch, options=options), batched=True, batch_size=256,
                       num_proc=num_proc, remove_columns=["item"], new_fingerprint=uuid.uuid4().hex,
                       load_from_cache_file=False, desc="tokenising")
    return (pickle.loads(blob) for blob in mapped.data.column("outcome").to_pylist())
