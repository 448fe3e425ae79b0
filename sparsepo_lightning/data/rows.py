"""What the data pipeline passes around: raw rows with their location, validated pairs, rejections and the
data report. No I/O here: ``readers`` produce :class:`RawRow` streams, ``validate`` turns them into pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
Text = str | Messages
Span = tuple[int, int, float]
"""``(start, end, weight)``: characters ``start:end`` of a response's text (end exclusive) carry ``weight``."""
Spans = tuple[Span, ...]

REASONS = ("bad_json", "missing_field", "wrong_type", "empty_response", "identical_responses", "bad_spans")
"""Why a row can be rejected, in the order they are reported. Task converters (``RawRow.rejection``) may
add their own reasons (e.g. ``prompt_mismatch``); those are reported after these, in order of appearance."""


@dataclass
class PreferencePair:
    """One validated preference pair.

    Attributes:
        prompt: the prompt as text, or the list of chat messages before the responses (may be empty).
        chosen: the preferred response as text, or its chat messages (usually one assistant message).
        rejected: the dispreferred response, same convention as ``chosen``.
        source: where the row came from, e.g. ``data/x.jsonl:12`` or ``org/name[train]#41``.
        chosen_spans: optional per-token weights of ``chosen`` as character spans, sorted and non-overlapping,
            offsets into the response text (or into the content of its single chat message); ``None``: none.
        rejected_spans: the same for ``rejected``.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""
    chosen_spans: Spans | None = None
    rejected_spans: Spans | None = None


@dataclass
class UnpairedExample:
    """One validated unpaired example (TRL's unpaired preference format; BCO trains on them).

    Attributes:
        prompt: the prompt as text or chat messages (may be empty), as in :class:`PreferencePair`.
        completion: the response as text or chat messages.
        desirable: the row's ``label``: True for a desirable (good) completion, False for an undesirable one.
        source: where the row came from, e.g. ``data/x.jsonl:12``.
    """

    prompt: Text
    completion: Text
    desirable: bool
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
        items: what a kept row is, in the summary: ``pairs``, or ``examples`` for unpaired rows.
        prompt_variants: names of the prompt variants tokenised with each pair (``prompt_variants.py``).
        variant_prompts_truncated: kept pairs with a prompt variant (``prompt_variants.py``) cut from the left so
            that ``[variant prompt | response]`` fits ``max_length``.
    """

    source: str
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, RowIssue] = field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0
    items: str = "pairs"
    prompt_variants: list[str] = field(default_factory=list)
    variant_prompts_truncated: int = 0

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
                f"{self.responses_truncated} {self.items} with responses cut at max_length"
            )
        if self.prompt_variants:
            lines.append(f"  prompt variants: {', '.join(self.prompt_variants)} (2 extra rows per pair each)")
        if self.variant_prompts_truncated:
            lines.append(f"  prompt variants truncated (kept): {self.variant_prompts_truncated} {self.items} with a "
                         "variant prompt cut from the left to fit max_length")
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
    """Names of the prompt / chosen / rejected columns and of the optional span columns of each response."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    chosen_spans: str = "chosen_spans"
    rejected_spans: str = "rejected_spans"


@dataclass(frozen=True)
class UnpairedFieldNames:
    """Names of the prompt / completion / label columns of unpaired rows."""

    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"
