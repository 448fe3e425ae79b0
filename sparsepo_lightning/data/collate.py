"""Pad tokenised pairs into one :class:`PreferenceBatch` of 2B rows (chosen rows first, then rejected), or N tokenised
unpaired examples into one of N rows with their labels (``collate_examples``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch

_SIDES = ("chosen", "rejected")
ROW_ID = "__row_id__"
"""Feature key under which ``WithRowIds`` passes each feature's index to the collate functions."""


class WithRowIds(Sequence):
    """A split's features, each served with its index under ``ROW_ID``: the collate functions turn them into
    ``PreferenceBatch.row_ids``, which ties every row of a batch to its split row whatever the sampler's order."""

    def __init__(self, features: Sequence[Mapping[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {**self.features[index], ROW_ID: int(index)}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several rows in one read, as the features' own ``__getitems__`` (``CachedFeatures``) if they have one."""
        many = getattr(self.features, "__getitems__", None)
        rows = many(indices) if many is not None else [self.features[i] for i in indices]
        return [{**row, ROW_ID: int(i)} for row, i in zip(rows, indices, strict=True)]


def row_ids(features: Sequence[Mapping[str, Any]]) -> tuple[int, ...] | None:
    """The features' ``ROW_ID`` values in order, or None unless every feature has one."""
    ids = tuple(f.get(ROW_ID) for f in features)
    return None if None in ids else ids


def collate_pairs(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> PreferenceBatch:
    """Right-pad B tokenised pairs to the longest of their 2B rows.

    Example (B=2, pad 0, prompt ids 5, response ids 7/8/9)::

        features = [{"chosen_input_ids": [5, 7], "chosen_labels": [-100, 7],
                     "rejected_input_ids": [5, 8, 8], "rejected_labels": [-100, 8, 8]},
                    {"chosen_input_ids": [5, 9], ..., "rejected_input_ids": [5, 7], ...}]
        input_ids      = [[5, 7, 0], [5, 9, 0], [5, 8, 8], [5, 7, 0]]   # rows: c0, c1, r0, r1
        attention_mask = [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
        labels         = [[-100, 7, -100], ..., [-100, 8, 8], ...]

    Args:
        features: B dicts with ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
            ``rejected_labels`` (as made by ``tokenize_pair``), and for sides with character spans
            ``{side}_span_weights`` / ``{side}_span_covered``; other keys are ignored.
        pad_token_id: id written into padding positions of ``input_ids`` (masked out by the attention mask).

    Returns:
        ``PreferenceBatch`` with ``(2B, T)`` int64 ``input_ids``, ``attention_mask`` and ``labels``, where
        ``T`` is the longest row; row ``i`` is the chosen and row ``B + i`` the rejected response of pair ``i``.
        When any feature has span keys, also ``token_weights`` (float32) and ``token_weighted`` (bool), both
        ``(2B, T)``, not shifted: the span weight / coverage of each token, 0 / False on padding and on rows
        without spans. Otherwise both are ``None``. When the features carry prompt variants
        (``variant_<name>_prompt_ids``, ``tokenize_pair``'s ``prompt_variants``), also ``prompt_variants``: per name a
        ``PreferenceBatch`` of the 2B rows ``[variant prompt | the row's response tokens]`` in the same order, whose
        labels are set on exactly the response tokens the row's own shifted labels score (see ``variant_rows``).

    Raises:
        ValueError: empty ``features``, or ids and labels (or span weights) of different lengths.
    """
    if not features:
        raise ValueError("collate_pairs: got an empty list of features; a batch needs at least one pair.")
    ids = [_row(f, f"{side}_input_ids") for side in _SIDES for f in features]
    labels = [_row(f, f"{side}_labels") for side in _SIDES for f in features]
    input_ids, attention_mask, label_ids = _pad(ids, labels, pad_token_id, "collate_pairs")  # (2B, T) each
    token_weights = token_weighted = None
    if any(f"{side}_span_weights" in f for side in _SIDES for f in features):
        weights, covered = _span_rows(features, [len(row) for row in ids])
        token_weights = pad_sequence(weights, batch_first=True, padding_value=0.0)  # (2B, T) float32
        token_weighted = pad_sequence(covered, batch_first=True, padding_value=False)  # (2B, T) bool
    return PreferenceBatch(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids,
                           token_weights=token_weights, token_weighted=token_weighted,
                           prompt_variants=variant_rows(features, pad_token_id), row_ids=row_ids(features))


def variant_rows(features: Sequence[Mapping[str, Sequence[int]]],
                 pad_token_id: int) -> dict[str, PreferenceBatch] | None:
    """The prompt-variant rows of a batch (None without variants): per variant, ``collate_pairs`` of the pairs
    ``variant_features`` makes."""
    variants = [variant_features(f) for f in features]
    if not variants[0]:
        return None
    return {name: collate_pairs([v[name] for v in variants], pad_token_id) for name in variants[0]}


def variant_features(feature: Mapping[str, Sequence[int]]) -> dict[str, dict[str, list[int]]]:
    """Per prompt variant (``variant_<name>_prompt_ids``, by name), the tokenised pair ``[variant prompt | chosen
    response]``, ``[variant prompt | rejected response]``, labelled on the responses. A response that starts at
    position 0 (empty prompt) has no prediction for its first token in its own row, so its first label is ignored
    here too: each variant row scores exactly the tokens its original row scores, in the same order."""
    names = sorted(k[len("variant_"):-len("_prompt_ids")] for k in feature
                   if k.startswith("variant_") and k.endswith("_prompt_ids"))
    # per side: a tokenizer may merge the prompt's last characters into the response's first token on one side only
    prompts = {side: sum(label == IGNORE_INDEX for label in feature[f"{side}_labels"]) for side in _SIDES}
    out = {}
    for name in names:
        variant_prompt = list(feature[f"variant_{name}_prompt_ids"])
        pair = {}
        for side, prompt in prompts.items():
            response = list(feature[f"{side}_labels"][prompt:])
            if prompt == 0:
                response[0] = IGNORE_INDEX
            pair[f"{side}_input_ids"] = variant_prompt + list(feature[f"{side}_input_ids"][prompt:])
            pair[f"{side}_labels"] = [IGNORE_INDEX] * len(variant_prompt) + response
        out[name] = pair
    return out


def collate_examples(features: Sequence[Mapping[str, Sequence[int] | bool]], pad_token_id: int) -> PreferenceBatch:
    """Right-pad N tokenised unpaired examples (``tokenize_example``'s output) into N rows, in their order.

    Returns:
        ``PreferenceBatch`` with ``(N, T)`` ``input_ids``, ``attention_mask`` and ``labels`` (as ``collate_pairs``)
        and ``desirable``, an ``(N,)`` bool tensor of the examples' labels.

    Raises:
        ValueError: empty ``features``, or ids and labels of different lengths.
    """
    if not features:
        raise ValueError("collate_examples: got an empty list of features; a batch needs at least one example.")
    ids = [_row(f, "input_ids") for f in features]
    labels = [_row(f, "labels") for f in features]
    input_ids, attention_mask, label_ids = _pad(ids, labels, pad_token_id, "collate_examples")
    desirable = torch.tensor([bool(f["desirable"]) for f in features], dtype=torch.bool)
    return PreferenceBatch(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids, desirable=desirable,
                           row_ids=row_ids(features))


def _pad(ids: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int,
         caller: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, each ``(rows, T)`` int64, right-padded to the longest row."""
    if any(len(a) != len(b) for a, b in zip(ids, labels, strict=True)):
        raise ValueError(f"{caller}: input_ids and labels of a row differ in length; use the tokenizer functions' "
                         "output (tokenize_pair, tokenize_example).")
    lengths = torch.tensor([len(row) for row in ids])
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
    label_ids = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return input_ids, attention_mask, label_ids


def _row(feature: Mapping[str, Sequence[int]], key: str) -> torch.Tensor:
    return torch.as_tensor(feature[key], dtype=torch.long)


def _span_rows(
    features: Sequence[Mapping[str, Sequence[int]]], lengths: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Span weights (float32) and coverage (bool) of the 2B rows in batch order; zeros for sides without spans."""
    weights, covered = [], []
    for row, (side, feature) in enumerate((side, f) for side in _SIDES for f in features):
        if f"{side}_span_weights" not in feature:
            weights.append(torch.zeros(lengths[row], dtype=torch.float32))
            covered.append(torch.zeros(lengths[row], dtype=torch.bool))
            continue
        weights.append(torch.as_tensor(feature[f"{side}_span_weights"], dtype=torch.float32))
        covered.append(torch.as_tensor(feature[f"{side}_span_covered"], dtype=torch.bool))
        if not len(weights[-1]) == len(covered[-1]) == lengths[row]:
            raise ValueError(
                f"collate_pairs: {side}_span_weights/{side}_span_covered of a row differ in length from its "
                "input_ids; use tokenize_pair's output."
            )
    return weights, covered
