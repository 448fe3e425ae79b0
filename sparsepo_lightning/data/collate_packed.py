"""Collate tokenised pairs into the packed layout (``data.layout: packed``, ``sparsepo_lightning/packing.py``), and
the token cost of a batch in either layout (for ``data.max_tokens`` batching)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sparsepo_lightning.data.collate import collate_pairs, variant_features
from sparsepo_lightning.data.tokenize import common_prefix_length
from sparsepo_lightning.packing import CHOSEN, REJECTED, SHARED, PackedRows
from sparsepo_lightning.types import PreferenceBatch


def segment_length(feature: Mapping[str, Sequence[int]]) -> int:
    """Tokens of one pair in the packed layout: ``len(chosen) + len(rejected) − shared prefix``."""
    chosen, rejected = feature["chosen_input_ids"], feature["rejected_input_ids"]
    return len(chosen) + len(rejected) - common_prefix_length(chosen, rejected)


def padded_cost(features: Sequence[Mapping[str, Sequence[int]]]) -> int:
    """Positions a batch costs in the padded layout: ``2B ×`` its longest row, plus ``2B ×`` the longest row of each
    prompt variant (``padded_row_lengths``)."""
    lengths = [padded_row_lengths(f) for f in features]
    return 2 * len(features) * sum(max(column) for column in zip(*lengths, strict=True))


def padded_row_lengths(feature: Mapping[str, Sequence[int]]) -> list[int]:
    """The longer of a pair's two rows, then per prompt variant (``collate.variant_features``, by name) the longer of
    its two variant rows ``[variant prompt | response]``."""
    pairs = [feature, *variant_features(feature).values()]
    return [max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in pairs]


def segment_lengths(feature: Mapping[str, Sequence[int]]) -> list[int]:
    """``segment_length`` of a pair, then of each of its prompt variants (packed separately, one forward each)."""
    return [segment_length(p) for p in (feature, *variant_features(feature).values())]


def packed_cost(features: Sequence[Mapping[str, Sequence[int]]], pack_length: int | None = None) -> int:
    """Positions a batch costs in the packed layout (``R × L``, padding between rows included), summed over the
    pairs' own packing and each prompt variant's."""
    groups = zip(*(segment_lengths(f) for f in features), strict=True)
    total = 0
    for lengths in groups:
        rows = _pack_rows(list(lengths), pack_length)
        total += len(rows) * max(sum(n for _, n in row) for row in rows)
    return total


def collate_packed(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int,
                   pack_length: int | None = None) -> PreferenceBatch:
    """``collate_pairs``'s padded batch plus its packed layout (``batch.packed``), which the models run on.

    Example (B=1, prompt ``5 6``, chosen ``7 8``, rejected ``9``)::

        padded input_ids = [[5, 6, 7, 8], [5, 6, 9, 0]]
        packed input_ids = [[5, 6, 7, 8, 9]]       position_ids = [[0, 1, 2, 3, 2]]
        branch           = [[0, 0, 1, 1, 2]]       index        = [[0, 1, 2, 3], [0, 1, 4, 0]]

    Args:
        features: B tokenised pairs (``tokenize_pair``'s output).
        pad_token_id: id of padding positions in both layouts.
        pack_length: most tokens per packed row; pairs are placed first-fit in batch order (a pair longer than
            ``pack_length`` gets a row of its own). None puts all pairs of the batch in one row: no padding at all.

    Returns:
        The padded ``PreferenceBatch`` of ``collate_pairs`` with ``packed`` set; its ``prompt_variants`` (if any) are
        packed the same way, each variant on its own (its rows share the variant prompt as their prefix).
    """
    batch = collate_pairs(features, pad_token_id)
    num_pairs, width = len(features), batch.input_ids.shape[1]
    segments = []  # per pair: (ids, positions, branch, chosen flat offsets, rejected flat offsets) within the segment
    for feature in features:
        chosen, rejected = list(feature["chosen_input_ids"]), list(feature["rejected_input_ids"])
        shared = common_prefix_length(chosen, rejected)
        tail = len(rejected) - shared
        ids = chosen + rejected[shared:]
        positions = list(range(len(chosen))) + list(range(shared, len(rejected)))
        branch = [SHARED] * shared + [CHOSEN] * (len(chosen) - shared) + [REJECTED] * tail
        rejected_at = list(range(shared)) + list(range(len(chosen), len(chosen) + tail))
        segments.append((ids, positions, branch, list(range(len(chosen))), rejected_at))
    rows = _pack_rows([len(s[0]) for s in segments], pack_length)
    length = max(sum(n for _, n in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    branch_ids = torch.full((len(rows), length), SHARED, dtype=torch.long)
    index = torch.zeros((2 * num_pairs, width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for pair, n in row:
            ids, positions, branch, chosen_at, rejected_at = segments[pair]
            cols = slice(start, start + n)
            input_ids[r, cols] = torch.tensor(ids)
            position_ids[r, cols] = torch.tensor(positions)
            segment_ids[r, cols] = pair
            branch_ids[r, cols] = torch.tensor(branch)
            base = r * length + start
            index[pair, : len(chosen_at)] = base + torch.tensor(chosen_at)
            index[num_pairs + pair, : len(rejected_at)] = base + torch.tensor(rejected_at)
            start += n
    batch.packed = PackedRows(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids,
                              branch=branch_ids, index=index)
    if batch.prompt_variants:  # each variant packed on its own: its prompt is the shared prefix of its two rows
        variants = [variant_features(f) for f in features]
        batch.prompt_variants = {name: collate_packed([v[name] for v in variants], pad_token_id, pack_length)
                                 for name in batch.prompt_variants}
    return batch


def first_fit(fills: list[int], size: int, pack_length: int | None) -> int:
    """Place a segment of ``size`` tokens in the first packed row with room for it (every segment in row 0 when
    ``pack_length`` is None; a new row when none has room); adds it to ``fills`` (tokens per row) and returns the row.
    The one packing rule: ``collate_packed`` builds its rows with it and token budgets price micro-batches with it."""
    for row, fill in enumerate(fills):
        if pack_length is None or fill + size <= pack_length:
            fills[row] += size
            return row
    fills.append(size)
    return len(fills) - 1


def _pack_rows(lengths: Sequence[int], pack_length: int | None) -> list[list[tuple[int, int]]]:
    """Rows of ``(pair, length)``, pairs placed in order by ``first_fit``."""
    rows: list[list[tuple[int, int]]] = []
    fills: list[int] = []
    for pair, n in enumerate(lengths):
        row = first_fit(fills, n, pack_length)
        if row == len(rows):
            rows.append([])
        rows[row].append((pair, n))
    return rows
