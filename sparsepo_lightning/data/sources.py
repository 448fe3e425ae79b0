"""Read preference rows from JSONL / JSON / Parquet files or hub datasets, and validate them into pairs.

Every source is turned into a stream of :class:`RawRow` (a location such as ``data/x.jsonl:12`` plus the
decoded value); one validator (:func:`validate_rows`) then checks all sources the same way. Bad rows are
never dropped silently: they are counted per reason in a :class:`DataReport` (or raise in strict mode).

Accepted row shapes (field names configurable):

- ``{"prompt": str, "chosen": str, "rejected": str}``: plain text.
- ``{"prompt": [messages], "chosen": [messages] | str, "rejected": ...}``: chat messages
  ``{"role": ..., "content": ...}``; a plain string on either side is allowed.
- ``{"chosen": [conversation], "rejected": [conversation]}`` without a prompt field ("implicit prompt"):
  the prompt is the longest run of shared leading messages, the responses are what follows it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsepo_lightning.errors import ConfigError, DataError, MissingFileError

Messages = list[dict[str, str]]
Text = str | Messages

REASONS = ("bad_json", "missing_field", "wrong_type", "empty_response", "identical_responses")
"""Why a row can be rejected, in the order they are reported. Task converters (``RawRow.rejection``) may
add their own reasons (e.g. ``prompt_mismatch``); those are reported after these, in order of appearance."""

_JSON_LIST_KEYS = ("data", "train")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class PreferencePair:
    """One validated preference pair.

    Attributes:
        prompt: the prompt as text, or the list of chat messages before the responses (may be empty).
        chosen: the preferred response as text, or its chat messages (usually one assistant message).
        rejected: the dispreferred response, same convention as ``chosen``.
        source: where the row came from, e.g. ``data/x.jsonl:12`` or ``org/name[train]#41``.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""


@dataclass(frozen=True)
class RowIssue:
    """First example of one rejection reason.

    Attributes:
        reason: one of :data:`REASONS`.
        location: ``file:line``, ``file row N`` or ``name[split]#index``.
        field: the offending field name(s), or ``None`` for whole-row problems.
        message: the full human-readable message, including the fix.
    """

    reason: str
    location: str
    field: str | None
    message: str


@dataclass
class DataReport:
    """What happened to the rows of one source: kept, rejected per reason, truncated.

    Attributes:
        source: the file path or ``name[split]`` the rows came from.
        rows_read: rows seen (including bad ones).
        counts: rejected rows per reason (see :data:`REASONS`).
        first: the first rejected row of each reason.
        prompts_truncated: kept pairs whose prompt was cut from the left (tokenisation step).
        responses_truncated: kept pairs whose response(s) were cut at ``max_length``.
    """

    source: str
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, RowIssue] = field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    @property
    def rows_rejected(self) -> int:
        return sum(self.counts.values())

    @property
    def rows_kept(self) -> int:
        return self.rows_read - self.rows_rejected

    def reject(self, issue: RowIssue) -> None:
        """Count one rejected row (the row must already be counted in ``rows_read``)."""
        self.counts[issue.reason] = self.counts.get(issue.reason, 0) + 1
        self.first.setdefault(issue.reason, issue)

    def summary(self) -> str:
        """One paragraph: kept/read, each rejection reason with its first location, truncations."""
        lines = [f"{self.source}: kept {self.rows_kept} of {self.rows_read} rows"]
        for reason in [*REASONS, *(r for r in self.counts if r not in REASONS)]:
            if reason in self.counts:
                issue = self.first[reason]
                lines.append(f"  rejected {self.counts[reason]} x {reason}; first at {issue.message}")
        if self.prompts_truncated or self.responses_truncated:
            lines.append(
                f"  truncated (kept): {self.prompts_truncated} prompts from the left, "
                f"{self.responses_truncated} pairs with responses cut at max_length"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Rejection:
    """Why a task converter refused a row; the validator counts it like any other bad row.

    Attributes:
        reason: a short snake_case name, one of :data:`REASONS` or a task-specific one (``prompt_mismatch``).
        field: the offending field, or ``None`` for whole-row problems.
        problem: what is wrong, e.g. ``"the transcript has no 'Assistant:' turn"``.
        fix: what the user can do about it.
    """

    reason: str
    field: str | None
    problem: str
    fix: str


@dataclass(frozen=True)
class RawRow:
    """One undecoded-or-decoded row and where it came from.

    ``decode_error`` is set for unreadable rows; ``rejection`` for rows a task converter refused (the
    validator counts both and never silently drops a row).
    """

    location: str
    value: Any = None
    decode_error: str | None = None
    rejection: Rejection | None = None


@dataclass(frozen=True)
class FieldNames:
    """Names of the prompt / chosen / rejected columns."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class _RowError(Exception):
    """Internal: one row failed one check. The message reads ``<where> field '<field>': <problem>. Fix: <fix>``."""

    def __init__(self, reason: str, where: str, field_name: str | None, problem: str, fix: str) -> None:
        named = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}{named}: {problem}. Fix: {fix}.")
        self.reason = reason
        self.field_name = field_name


# Row iterators: one per source kind, nothing else differs. ---------------------------------------------------


def iter_jsonl(path: str | Path) -> Iterator[RawRow]:
    """Rows of a JSON-lines file, one per non-blank line, located as ``path:line``.

    A line that is not UTF-8, not JSON, or nested too deeply to decode is one ``bad_json`` row; the other lines
    are still read.
    """
    with open(path, "rb") as f:  # bytes: one undecodable line must not stop the whole file
        for line_no, raw in enumerate(f, start=1):
            location = f"{path}:{line_no}"
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(location, decode_error=f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at "
                                                    f"character {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield RawRow(location, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(location, decode_error=f"{e.msg} at character {e.pos + 1}")
            except RecursionError:
                yield RawRow(location, decode_error="nested too deeply to decode")


def iter_json(path: str | Path) -> Iterator[RawRow]:
    """Rows of a JSON file holding a list of rows, or ``{"data": [...]}`` / ``{"train": [...]}``.

    Each row is located by the line on which its object starts (``path:line``). A syntax error makes the
    whole file unreadable; it is reported as one ``bad_json`` row at the line JSON's decoder names.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        yield RawRow(f"{path}:{line}", decode_error="not valid UTF-8 (the whole file is unreadable)")
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        yield RawRow(f"{path}:{e.lineno}", decode_error=f"column {e.colno}: {e.msg} (the whole file is unreadable)")
        return
    except RecursionError:
        yield RawRow(f"{path}:1", decode_error="nested too deeply to decode (the whole file is unreadable)")
        return
    rows, start = _json_row_list(document, text, path)
    lines = _json_row_lines(text, start, len(rows))
    for index, value in enumerate(rows):
        yield RawRow(f"{path}:{lines[index]}" if lines else f"{path}#{index}", value)


def _json_row_list(document: Any, text: str, path: str | Path) -> tuple[list[Any], int | None]:
    """The list of rows in a parsed JSON document and the character offset of its ``[`` (if found)."""
    if isinstance(document, list):
        return document, text.index("[")
    if isinstance(document, dict):
        for key in _JSON_LIST_KEYS:
            if isinstance(document.get(key), list):
                match = re.search(r'"' + key + r'"\s*:\s*\[', text)
                return document[key], None if match is None else match.end() - 1
    keys = sorted(document) if isinstance(document, dict) else None
    raise DataError(
        f"{path}: expected a JSON list of rows or an object with a 'data' or 'train' list, "
        f"got {type(document).__name__} (keys {keys}). "
        'Fix: store the rows as a top-level list or as {"data": [...]}, or convert the file to JSONL.'
    )


def _json_row_lines(text: str, start: int | None, count: int) -> list[int] | None:
    """1-based line on which each element of the JSON array at ``text[start] == '['`` begins.

    Returns ``None`` when the positions cannot be recovered (rows are then named ``path#index``).
    """
    if start is None:
        return None
    decoder = json.JSONDecoder()
    space = re.compile(r"[ \t\n\r]*")
    index, lines = space.match(text, start + 1).end(), []
    try:
        while text[index] != "]":
            lines.append(text.count("\n", 0, index) + 1)
            _, index = decoder.raw_decode(text, index)
            index = space.match(text, index).end()
            if text[index] == ",":
                index = space.match(text, index + 1).end()
    except (ValueError, IndexError, RecursionError):
        return None
    return lines if len(lines) == count else None


def iter_parquet(path: str | Path, batch_rows: int = 1024) -> Iterator[RawRow]:
    """Rows of a Parquet file, located as ``path row N`` with N counted from 1."""
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for value in batch.to_pylist():
            row_no += 1
            yield RawRow(f"{path} row {row_no}", value)


def load_hub_split(name: str, config: str | None, split: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, config, split=split, **kwargs)`` with an error naming the options to fix.

    ``name`` may be a hub id (``Anthropic/hh-rlhf``) or a local folder in the same layout (how the task
    loaders are tested offline); ``kwargs`` are passed on (``data_dir``, ``data_files``, ``revision``...).
    """
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}, options {kwargs}): {e}. "
            "Fix: check hub_dataset / hub_config / hub_kwargs, and set train_split / val_split to splits that "
            "exist (val_split: null disables the hub validation split)."
        ) from e


def iter_hub(name: str, config: str | None, split: str, **kwargs: Any) -> Iterator[RawRow]:
    """Rows of a hub dataset split, located as ``name[split]#index`` (0-based, as in ``dataset[index]``)."""
    for index, value in enumerate(load_hub_split(name, config, split, **kwargs)):
        yield RawRow(f"{name}[{split}]#{index}", value)


def iter_file(path: str | Path) -> Iterator[RawRow]:
    """Dispatch on the suffix: ``.jsonl``, ``.json`` or ``.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {str(path)!r} does not exist. Fix: check train_file/val_file/test_file.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path)
    if suffix == ".json":
        return iter_json(path)
    if suffix == ".parquet":
        return iter_parquet(path)
    raise ConfigError(
        f"{path}: unsupported file type {suffix!r}. Fix: use one of {', '.join(_FILE_SUFFIXES)}, "
        "or load it with `datasets` and pass a hub_dataset name."
    )


# Validation: the same for every source. ---------------------------------------------------------------------


def load_pairs(
    path: str | Path | None = None,
    *,
    hub_dataset: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
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
    fields = FieldNames(prompt_field, chosen_field, rejected_field)
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
    report = DataReport(source=source)
    pairs = []
    for row in rows:
        report.rows_read += 1
        try:
            pairs.append(_row_to_pair(row, fields))
        except _RowError as e:
            if strict:
                raise DataError(
                    f"{e} (strict=True stops at the first bad row; strict=False counts and skips them)"
                ) from None
            report.reject(RowIssue(e.reason, row.location, e.field_name, str(e)))
    return pairs, report


def _row_to_pair(row: RawRow, fields: FieldNames) -> PreferencePair:
    """Validate one row; raises ``_RowError`` naming the location, field, problem and fix."""
    where, value = row.location, row.value
    if row.decode_error is not None:
        raise _RowError("bad_json", where, None, f"invalid JSON ({row.decode_error})", "make each row one JSON object")
    if row.rejection is not None:
        r = row.rejection
        raise _RowError(r.reason, where, r.field, r.problem, r.fix)
    if not isinstance(value, dict):
        layout = f'{{"{fields.prompt}": ..., "{fields.chosen}": ..., "{fields.rejected}": ...}}'
        problem = f"a row must be a JSON object, got {type(value).__name__}"
        raise _RowError("wrong_type", where, None, problem, f"write each row as {layout}")
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
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=where)


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
