"""Validate preference rows into pairs, the same way for every source.

Every source is turned into a stream of :class:`~sparsepo_lightning.data.rows.RawRow` by
:mod:`sparsepo_lightning.data.readers`; one validator (:func:`validate_rows`) then checks all sources alike.
Bad rows are never dropped silently: they are counted per reason in a :class:`DataReport` (or raise in strict mode).

Accepted row shapes (field names configurable):

- ``{"prompt": str, "chosen": str, "rejected": str}``: plain text.
- ``{"prompt": [messages], "chosen": [messages] | str, "rejected": ...}``: chat messages
  ``{"role": ..., "content": ...}``; a plain string on either side is allowed.
- ``{"chosen": [conversation], "rejected": [conversation]}`` without a prompt field ("implicit prompt"):
  the prompt is the longest run of shared leading messages, the responses are what follows it.

Any row may also carry ``chosen_spans`` / ``rejected_spans``: per-token weights of that response as character
spans ``[[start, end, weight], ...]`` (see :func:`load_pairs`); a bad span list rejects the row as ``bad_spans``.

Unpaired rows (TRL's unpaired preference format, for BCO) are validated by :func:`validate_examples` with the same
reasons and messages: ``{"prompt": str | [messages], "completion": str | [messages], "label": true | false}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from sparsepo_lightning.data.readers import iter_file, iter_hub
from sparsepo_lightning.data.rows import (
    DataReport,
    FieldNames,
    Messages,
    PreferencePair,
    RawRow,
    RowIssue,
    Spans,
    Text,
    UnpairedExample,
    UnpairedFieldNames,
)
from sparsepo_lightning.errors import DataError

_Item = TypeVar("_Item", PreferencePair, UnpairedExample)


class _RowError(Exception):
    """Internal: one row failed one check. The message reads ``<where> field '<field>': <problem>. Fix: <fix>``."""

    def __init__(self, reason: str, where: str, field_name: str | None, problem: str, fix: str) -> None:
        named = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}{named}: {problem}. Fix: {fix}.")
        self.reason = reason
        self.field_name = field_name


def load_pairs(
    path: str | Path | None = None,
    *,
    hub_dataset: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    chosen_spans_field: str = "chosen_spans",
    rejected_spans_field: str = "rejected_spans",
    strict: bool = False,
) -> tuple[list[PreferencePair], DataReport]:
    """Read and validate preference pairs from one local file or one hub dataset split.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file. Exactly one of ``path`` / ``hub_dataset``.
        hub_dataset: a name for ``datasets.load_dataset`` (downloads unless cached).
        hub_config: the dataset configuration name, if any.
        split: the hub split to read (ignored for files).
        prompt_field: column holding the prompt (may be absent for implicit-prompt conversations).
        chosen_field: column holding the preferred response.
        rejected_field: column holding the dispreferred response.
        chosen_spans_field: optional column of per-token weights of the chosen response as character spans
            ``[[start, end, weight], ...]``: whole-number offsets into the response text (``0 <= start < end <=
            len(text)``, end exclusive, Python string indices), a finite weight, sorted and non-overlapping. Only
            for a plain-text response or one of exactly one chat message (offsets into its content). The column
            may be absent, or null, in any row.
        rejected_spans_field: the same for the rejected response.
        strict: raise on the first bad row instead of skipping and counting it.

    Returns:
        ``(pairs, report)``; the report counts every skipped row by reason.

    Raises:
        ValueError: in strict mode on the first bad row; always when no valid row remains.
    """
    if (path is None) == (hub_dataset is None):
        raise ValueError("load_pairs: pass exactly one of `path` (a local file) or `hub_dataset` (a hub name).")
    if path is not None:
        rows, source = iter_file(path), str(path)
    else:
        rows, source = iter_hub(hub_dataset, hub_config, split), f"{hub_dataset}[{split}]"
    fields = FieldNames(prompt_field, chosen_field, rejected_field, chosen_spans_field, rejected_spans_field)
    pairs, report = validate_rows(rows, fields, source=source, strict=strict)
    if not pairs:
        raise DataError(f"no valid preference pair in {source}.\n{report.summary()}")
    return pairs, report


def validate_rows(
    rows: Iterable[RawRow], fields: FieldNames, *, source: str, strict: bool = False
) -> tuple[list[PreferencePair], DataReport]:
    """Turn raw rows into pairs, counting (or, in strict mode, raising on) every bad row.

    Returns:
        ``(pairs, report)`` in input order; may be empty (the caller decides whether that is an error).
    """
    return _validate(rows, lambda row: _row_to_pair(row, fields), DataReport(source=source), strict)


def validate_examples(
    rows: Iterable[RawRow], fields: UnpairedFieldNames, *, source: str, strict: bool = False
) -> tuple[list[UnpairedExample], DataReport]:
    """Turn raw unpaired rows into examples, counting (or, in strict mode, raising on) every bad row.

    A row needs a prompt (text or chat messages, may be empty), a non-empty completion (text or messages) and a
    label that is a JSON boolean: ``true`` (desirable) or ``false`` (undesirable); ``1``/``0`` or ``"true"`` are
    ``wrong_type``, so a column of scores or strings cannot pass as labels.

    Returns:
        ``(examples, report)`` in input order; may be empty (the caller decides whether that is an error).
    """
    return _validate(rows, lambda row: _row_to_example(row, fields), DataReport(source, items="examples"), strict)


def load_examples(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    label_field: str = "label",
    strict: bool = False,
) -> tuple[list[UnpairedExample], DataReport]:
    """Read and validate unpaired examples from one ``.jsonl``, ``.json`` or ``.parquet`` file, like
    :func:`load_pairs` (``validate_examples`` says what a valid row is). Raises ``DataError`` when none is valid."""
    fields = UnpairedFieldNames(prompt_field, completion_field, label_field)
    examples, report = validate_examples(iter_file(path), fields, source=str(path), strict=strict)
    if not examples:
        raise DataError(f"no valid unpaired example in {path}.\n{report.summary()}")
    return examples, report


def _validate(
    rows: Iterable[RawRow], convert: Callable[[RawRow], _Item], report: DataReport, strict: bool
) -> tuple[list[_Item], DataReport]:
    items = []
    for row in rows:
        report.rows_read += 1
        try:
            items.append(convert(row))
        except _RowError as e:
            if strict:
                raise DataError(
                    f"{e} (strict=True stops at the first bad row; strict=False counts and skips them)"
                ) from None
            report.reject(RowIssue(e.reason, row.location, e.field_name, str(e)))
    return items, report


def _row_object(row: RawRow, layout: str) -> dict[str, Any]:
    """The row's JSON object; raises ``_RowError`` for unreadable, refused or non-object rows."""
    where, value = row.location, row.value
    if row.decode_error is not None:
        raise _RowError("bad_json", where, None, f"invalid JSON ({row.decode_error})", "make each row one JSON object")
    if row.rejection is not None:
        r = row.rejection
        raise _RowError(r.reason, where, r.field, r.problem, r.fix)
    if not isinstance(value, dict):
        problem = f"a row must be a JSON object, got {type(value).__name__}"
        raise _RowError("wrong_type", where, None, problem, f"write each row as {layout}")
    return value


def _row_to_example(row: RawRow, fields: UnpairedFieldNames) -> UnpairedExample:
    """Validate one unpaired row; raises ``_RowError`` naming the location, field, problem and fix."""
    where = row.location
    value = _row_object(row, f'{{"{fields.prompt}": ..., "{fields.completion}": ..., "{fields.label}": true|false}}')
    completion = _response_field(value, fields.completion, "completion_field", where)
    if value.get(fields.prompt) is None:
        fix = f"add '{fields.prompt}' to every row (\"\" for none), or set prompt_field to the column of the prompt"
        raise _RowError("missing_field", where, fields.prompt, f"missing (row has keys {sorted(value)})", fix)
    prompt = _text_field(value, fields.prompt, where)
    if fields.label not in value or value[fields.label] is None:
        fix = f"add '{fields.label}': true (desirable) or false (undesirable), or set label_field to that column"
        raise _RowError("missing_field", where, fields.label, f"missing (row has keys {sorted(value)})", fix)
    label = value[fields.label]
    if not isinstance(label, bool):
        problem = f"expected a boolean (true: desirable, false: undesirable), got {_describe(label)}"
        fix = "write the label as JSON true or false (numbers and strings are refused, not guessed)"
        raise _RowError("wrong_type", where, fields.label, problem, fix)
    if _is_empty(completion):
        problem = "the response is empty (or only whitespace)"
        raise _RowError("empty_response", where, fields.completion, problem, "fill in the response or remove the row")
    return UnpairedExample(prompt=prompt, completion=completion, desirable=label, source=where)


def _row_to_pair(row: RawRow, fields: FieldNames) -> PreferencePair:
    """Validate one row; raises ``_RowError`` naming the location, field, problem and fix."""
    where = row.location
    value = _row_object(row, f'{{"{fields.prompt}": ..., "{fields.chosen}": ..., "{fields.rejected}": ...}}')
    chosen = _response_field(value, fields.chosen, "chosen_field", where)
    rejected = _response_field(value, fields.rejected, "rejected_field", where)
    if value.get(fields.prompt) is None:
        prompt, chosen, rejected = _split_implicit_prompt(value, chosen, rejected, fields, where)
    else:
        prompt = _text_field(value, fields.prompt, where)
    for name, response in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if _is_empty(response):
            problem = "the response is empty (or only whitespace)"
            raise _RowError("empty_response", where, name, problem, "fill in the response or remove the row")
    if _as_messages(chosen) == _as_messages(rejected):
        problem = "chosen and rejected are identical, so the pair expresses no preference"
        raise _RowError("identical_responses", where, f"{fields.chosen}/{fields.rejected}", problem, "remove the row")
    chosen_spans = _spans_field(value, fields.chosen_spans, fields.chosen, chosen, where)
    rejected_spans = _spans_field(value, fields.rejected_spans, fields.rejected, rejected, where)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=where,
                          chosen_spans=chosen_spans, rejected_spans=rejected_spans)


def _response_field(value: dict[str, Any], name: str, option: str, where: str) -> Text:
    if value.get(name) is None:
        fix = f"add '{name}' to every row, or set {option} to the column that holds this response"
        raise _RowError("missing_field", where, name, f"missing (row has keys {sorted(value)})", fix)
    return _text_field(value, name, where)


def _text_field(value: dict[str, Any], name: str, where: str) -> Text:
    """A field that must be a string or a list of ``{"role": str, "content": str}`` messages."""
    text = value[name]
    if isinstance(text, str):
        return text
    if isinstance(text, list) and all(_is_message(m) for m in text):
        return [{"role": m["role"], "content": m["content"]} for m in text]
    problem = f"expected a string or a list of {{'role': str, 'content': str}} messages, got {_describe(text)}"
    raise _RowError("wrong_type", where, name, problem, "convert the field to plain text or to chat messages")


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        inner = next((v for v in value if not _is_message(v)), None)
        return f"a list containing {type(inner).__name__} {str(inner)[:60]!r}"
    return f"{type(value).__name__} {str(value)[:60]!r}"


def _split_implicit_prompt(
    value: dict[str, Any], chosen: Text, rejected: Text, fields: FieldNames, where: str
) -> tuple[Messages, Messages, Messages]:
    """Prompt = shared leading messages of two full conversations; responses = what follows.

    The shared prefix stops one message before the end of either conversation, so two identical
    conversations still yield (identical) responses and are reported as ``identical_responses``.
    """
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        problem = f"missing (row has keys {sorted(value)}), and {fields.chosen}/{fields.rejected} are not conversations"
        fix = f"add '{fields.prompt}' to every row, set prompt_field, or store both responses as conversations"
        raise _RowError("missing_field", where, fields.prompt, problem, fix)
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        problem = f"missing, and the {fields.chosen}/{fields.rejected} conversations share no leading messages"
        fix = f"add '{fields.prompt}' to every row, or start both conversations with the same prompt messages"
        raise _RowError("missing_field", where, fields.prompt, problem, fix)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_empty(response: Text) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or all(not m["content"].strip() for m in response)


def _as_messages(response: Text) -> list[tuple[str, str]]:
    """Comparable form of a response: a plain string counts as one assistant message."""
    if isinstance(response, str):
        return [("assistant", response)]
    return [(m["role"], m["content"]) for m in response]


_SPAN_FIX = "write [[start, end, weight], ...] with whole-number character offsets into the response (end exclusive)"


def _spans_field(value: dict[str, Any], name: str, response_name: str, response: Text, where: str) -> Spans | None:
    """The optional span column ``name`` of one response, checked against its text; ``None`` when absent.

    Raises ``_RowError("bad_spans", ...)`` for anything but sorted, non-overlapping ``[start, end, weight]``
    lists with ``0 <= start < end <= len(text)`` and a finite weight, and for spans on a response of several
    chat messages (whose offsets would be ambiguous).
    """
    raw = value.get(name)
    if raw is None:
        return None
    if isinstance(response, list) and len(response) != 1:
        problem = (f"spans need a plain-text response or exactly one chat message, but '{response_name}' has "
                   f"{len(response)} messages")
        fix = f"store '{response_name}' as one string or one message, or drop '{name}' from this row"
        raise _RowError("bad_spans", where, name, problem, fix)
    text = response if isinstance(response, str) else response[0]["content"]
    if not isinstance(raw, list):
        raise _RowError("bad_spans", where, name, f"expected a list of spans, got {_describe(raw)}", _SPAN_FIX)
    spans: list[tuple[int, int, float]] = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list | tuple) and len(item) == 3):
            problem = f"span {i} is {str(item)[:60]!r}, not a [start, end, weight] list"
            raise _RowError("bad_spans", where, name, problem, _SPAN_FIX)
        start, end, weight = item
        if not (_is_whole(start) and _is_whole(end)):
            problem = f"span {i} {item!r}: start and end must be whole numbers (character offsets)"
            raise _RowError("bad_spans", where, name, problem, _SPAN_FIX)
        start, end = int(start), int(end)
        if not 0 <= start < end <= len(text):
            problem = (f"span {i} {item!r} is out of range: the '{response_name}' text has {len(text)} characters "
                       "and a span needs 0 <= start < end <= that length")
            fix = "count offsets in characters of this response's own text (not of prompt + response), end exclusive"
            raise _RowError("bad_spans", where, name, problem, fix)
        if not _is_finite(weight):
            problem = f"span {i} {item!r}: the weight must be a finite number, got {weight!r}"
            raise _RowError("bad_spans", where, name, problem, "give every span a finite numeric weight")
        if spans and start < spans[-1][1]:
            problem = (f"span {i} {item!r} starts at {start}, before span {i - 1} ends at {spans[-1][1]}; spans "
                       "must be sorted by start and must not overlap")
            raise _RowError("bad_spans", where, name, problem, "sort the spans and merge or split overlapping ones")
        spans.append((start, end, float(weight)))
    return tuple(spans)


def _is_whole(number: Any) -> bool:
    """An int, or a float without fractional part (Parquet stores mixed ``[start, end, weight]`` as floats)."""
    if isinstance(number, bool):
        return False
    return isinstance(number, int) or (isinstance(number, float) and number.is_integer())


def _is_finite(number: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite, also as a float."""
    if isinstance(number, bool) or not isinstance(number, int | float):
        return False
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False
