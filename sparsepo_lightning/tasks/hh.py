"""Anthropic HH (``Anthropic/hh-rlhf``): dialogue transcripts -> chat-message preference pairs (docs/method.md §6.3).

Each hub row is ``{"chosen": transcript, "rejected": transcript}``, a transcript being
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. Both transcripts share the
dialogue and differ in the final assistant turn. The pair is::

    prompt   = the chosen dialogue before its last assistant turn (user/assistant messages)
    chosen   = [the last assistant turn of `chosen`]
    rejected = [the last assistant turn of `rejected`]

The prompt is chat messages, so the tokenizer's chat template renders the whole conversation (docs/method.md §6.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.rows import Messages, RawRow, Rejection

HH_HUB_ID = "Anthropic/hh-rlhf"
_ROLES = {"Human": "user", "Assistant": "assistant"}
_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
"""A turn starts at ``Human:``/``Assistant:`` at the very start or after a blank line; anything else (other
paragraphs, a ``Human:`` inside a line) belongs to the current turn."""


class TranscriptError(ValueError):
    """A transcript cannot be read as a Human/Assistant dialogue."""


def parse_hh_transcript(text: str) -> Messages:
    """Split an hh-rlhf transcript into chat messages.

    Turns start at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` (or at the very start of the text); paragraphs
    that do not start with a role marker continue the previous turn and are kept with their blank lines.
    Contents are stripped of surrounding whitespace; a turn may be empty (``"...\\n\\nAssistant:"``).

    Example::

        >>> parse_hh_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello.\\n\\nHow can I help?")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.\\n\\nHow can I help?'}]

    Args:
        text: one ``chosen`` or ``rejected`` transcript.

    Returns:
        ``[{"role": "user" | "assistant", "content": str}, ...]`` in transcript order.

    Raises:
        TranscriptError: the text does not start with a ``Human:`` turn (after leading whitespace).
    """
    if not isinstance(text, str):
        raise TranscriptError(f"expected a transcript string, got {type(text).__name__}")
    body = text.lstrip("\n")
    markers = list(_MARKER.finditer(body))
    if not markers or markers[0].start() != 0 or markers[0].group(1) != "Human":
        raise TranscriptError(f"the transcript does not start with 'Human:' (it starts {body[:40]!r})")
    messages = []
    for marker, following in zip(markers, [*markers[1:], None], strict=True):
        end = following.start() if following is not None else len(body)
        messages.append({"role": _ROLES[marker.group(1)], "content": body[marker.end() : end].strip()})
    return messages


def hh_row_to_pair(chosen: str, rejected: str) -> dict[str, Messages] | Rejection:
    """``{prompt, chosen, rejected}`` messages of one hh-rlhf row, or why it cannot be converted.

    Empty final turns and identical responses are returned as a pair: the generic validator counts them
    (``empty_response`` / ``identical_responses``).
    """
    sides = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            messages = parse_hh_transcript(text)
        except TranscriptError as e:
            return _unparsable(name, str(e))
        if messages[-1]["role"] != "assistant":
            has_assistant = any(m["role"] == "assistant" for m in messages)
            problem = (
                "the transcript ends with a Human turn" if has_assistant else "the transcript has no Assistant turn"
            )
            return _unparsable(name, problem)
        sides[name] = messages
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        return Rejection(
            "prompt_mismatch",
            "chosen/rejected",
            "the dialogues before the last Assistant turn differ, so the two responses answer different prompts",
            "remove the row, or make both transcripts share every turn but the last",
        )
    return {"prompt": sides["chosen"][:-1], "chosen": sides["chosen"][-1:], "rejected": sides["rejected"][-1:]}


def _unparsable(field_name: str, problem: str) -> Rejection:
    fix = "write the transcript as '\\n\\nHuman: ...\\n\\nAssistant: ...', ending with an Assistant turn"
    return Rejection("unparsable_transcript", field_name, problem, fix)


class HHDataModule(PreferenceDataModule):
    """Anthropic HH preference pairs, from the hub, a local folder in its layout, or local files.

    The hub repository ``Anthropic/hh-rlhf`` holds one folder per subset, each with ``train.jsonl.gz`` and
    ``test.jsonl.gz``: ``harmless-base``, ``helpful-base``, ``helpful-online``, ``helpful-rejection-sampled``.
    Loaded without ``data_dir`` (the default), ``datasets`` concatenates the four subsets per split (160,800
    train / 8,552 test rows, the "all subsets" setup of docs/method.md §6.3); ``red-team-attempts`` holds single
    rated transcripts in another schema, and its ``red_team_attempts.jsonl.gz`` matches no split name, so it
    is not loaded. One subset::

        data:
          class_path: sparsepo_lightning.tasks.hh.HHDataModule
          init_args:
            hub_kwargs: {data_dir: helpful-base}
            max_length: 2048
            max_prompt_length: 1024

    Rows whose transcripts cannot be parsed (``unparsable_transcript``) or whose dialogues differ before the
    last assistant turn (``prompt_mismatch``) are counted in ``self.report`` like any other bad row.
    Local files (``train_file``/``val_file``) must use the hub schema too (``chosen``/``rejected``
    transcripts).

    Args:
        hub_dataset: hub id or local folder in the hub's layout. Setting ``train_file`` replaces the default
            hub id (so local files need no ``hub_dataset: null``); any other value with ``train_file`` is an error.
        train_split: hub split used for training.
        val_split: hub split used for validation (hh-rlhf has ``train`` and ``test``).
        system_prompt: put a system message with this content first in every prompt (``""`` reproduces the
            empty system message of the reference code, docs/method.md §6.1); ``None`` adds none.
        **kwargs: every other :class:`PreferenceDataModule` option (``tokenizer``, ``hub_kwargs``,
            ``max_length``, ``batch_size``...).
    """

    def __init__(
        self,
        hub_dataset: str | None = HH_HUB_ID,
        train_split: str = "train",
        val_split: str | None = "test",
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_file") and hub_dataset == HH_HUB_ID:
            hub_dataset = None  # a local training file replaces the *default* hub dataset
        super().__init__(hub_dataset=hub_dataset, train_split=train_split, val_split=val_split, **kwargs)
        self.system_prompt = system_prompt
        data_dir = str(self.hub_kwargs.get("data_dir", ""))
        if hub_dataset and data_dir.strip("/").startswith("red-team"):
            raise ValueError(
                f"data.hub_kwargs.data_dir={data_dir!r}: red-team-attempts holds single rated transcripts, not "
                "preference pairs. Fix: use harmless-base, helpful-base, helpful-online or "
                "helpful-rejection-sampled, or drop data_dir to load all four."
            )

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterator[RawRow]:
        """hh-rlhf rows -> ``{prompt, chosen, rejected}`` messages; unconvertible rows become rejections."""
        for row in rows:
            value = row.value
            if row.decode_error is not None or not _has_transcripts(value):
                yield row  # the generic validator names the problem (bad_json / wrong_type / missing_field)
                continue
            pair = hh_row_to_pair(value["chosen"], value["rejected"])
            if isinstance(pair, Rejection):
                yield RawRow(row.location, rejection=pair)
                continue
            if self.system_prompt is not None:
                pair["prompt"] = [{"role": "system", "content": self.system_prompt}, *pair["prompt"]]
            yield RawRow(row.location, pair)


def _has_transcripts(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), str) for k in ("chosen", "rejected"))
