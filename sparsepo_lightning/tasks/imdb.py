"""IMDB sentiment control (docs/method.md §6.2): ODPO's sampled-continuation files and builder pairs.

- review-prefix prompts for the sentiment pair builder live in :mod:`sparsepo_lightning.tasks.imdb_prompts`
  (``python -m sparsepo_lightning.builders.sentiment --imdb stanfordnlp/imdb --num-prompts 1000 ...``).
- :class:`IMDBDataModule` trains on either plain ``{prompt, chosen, rejected}`` rows (``format: pairs``, e.g.
  the builder's output) or ODPO's released ``imdb-sft-{split}.jsonl`` files (``format: odpo``): one line per
  sample ``{"prompt": str, "text": str, "reward": float}``, about 10 samples per prompt. Samples are grouped by
  prompt (in order of first appearance, whether or not a prompt's lines are consecutive) and each group gives
  at most one pair by ``pairing``: ``first_two`` (ODPO's ``imdb_paired_responses``: of the first two samples
  the higher reward is chosen) or ``best_worst`` (highest vs lowest reward).

How ODPO texts are joined to their prompt: the released ``text`` holds the continuation only, stripped of its
leading space (``"prompt": "I found it real shocking", "text": "for the time..."``); ODPO's trainer tokenises
prompt and text separately and concatenates the ids. We train on the string ``prompt + continuation`` instead,
so the continuation gets back the single space the sampler produced (``separator``), except when it starts
with punctuation (``.,;:!?)``), already starts with whitespace, or the prompt ends with whitespace. A ``text``
that starts with its prompt holds the whole sampled string: the prompt is cut off and the rest used as is.

Plain text, no chat template by default (the IMDB SFT models never saw one; docs/method.md §6.1 notes the
reference code applies one anyway). Example ``data:`` section::

    data:
      class_path: sparsepo_lightning.tasks.imdb.IMDBDataModule
      init_args:
        format: odpo
        pairing: first_two
        train_file: data/samples/imdb/imdb-sft-train.jsonl
        val_file: data/samples/imdb/imdb-sft-test.jsonl
        max_length: 256
        max_prompt_length: 64
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.pairing import PAIRINGS, SKIP_EMPTY, SKIP_IDENTICAL, SKIP_TIED, pair_samples
from sparsepo_lightning.data.rows import FieldNames, RawRow, Rejection

log = logging.getLogger(__name__)

FORMATS = ("pairs", "odpo")
"""``pairs``: rows are already ``{prompt, chosen, rejected}``; ``odpo``: ODPO's ``{prompt, text, reward}`` samples."""
ODPO_KEYS = ("prompt", "text", "reward")

_NO_SPACE_BEFORE = tuple(".,;:!?)")


# ODPO sample files -> pairs ------------------------------------------------------------------------------------


def join_continuation(prompt: str, text: str, separator: str = " ") -> str:
    """The response to train on, so that ``prompt + response`` reads as sampled (see the module docstring)."""
    if text.startswith(prompt):
        return text[len(prompt) :]
    if not text or text[0].isspace() or prompt[-1:].isspace() or text.startswith(_NO_SPACE_BEFORE):
        return text
    return separator + text


@dataclass
class _Group:
    """The samples of one prompt, and where the first of them was read."""

    location: str
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def odpo_pairs(
    rows: Iterable[RawRow], pairing: str = "first_two", fields: FieldNames | None = None, separator: str = " "
) -> Iterator[RawRow]:
    """Group ODPO sample rows by prompt and make one pair per group.

    Yields, in order of first appearance, one row per prompt named by its first sample's location (``file:line``)
    and holding ``prompt``/``chosen``/``rejected`` (under `fields`' names) plus ``chosen_score``,
    ``rejected_score`` and ``num_samples``; or a rejection: ``too_few_samples`` (one sample), ``tied_rewards``,
    ``empty_response``, ``identical_responses``. Unreadable lines and malformed samples (``missing_field``,
    ``wrong_type``) are yielded as their own rows, in place.

    Raises:
        ValueError: an unknown `pairing`.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"data.pairing={pairing!r} is unknown: use one of {', '.join(PAIRINGS)}.")
    fields = fields or FieldNames()
    groups: dict[str, _Group] = {}
    order: list[RawRow | str] = []  # bad rows in place, and each prompt at its first sample
    for row in rows:
        bad = _bad_sample(row)
        if bad is not None:
            order.append(bad)
            continue
        prompt, text, reward = (row.value[key] for key in ODPO_KEYS)
        if prompt not in groups:
            groups[prompt] = _Group(row.location)
            order.append(prompt)
        groups[prompt].texts.append(join_continuation(prompt, text, separator))
        groups[prompt].rewards.append(float(reward))
    for item in order:
        yield item if isinstance(item, RawRow) else _group_to_row(item, groups[item], pairing, fields)


def _bad_sample(row: RawRow) -> RawRow | None:
    """``row`` itself if unreadable, a rejection if it is not an ODPO sample, else ``None``."""
    if row.decode_error is not None or row.rejection is not None:
        return row
    value, fix = row.value, 'write each line as {"prompt": str, "text": str, "reward": float}'
    if not isinstance(value, dict):
        return RawRow(row.location, rejection=Rejection("wrong_type", None, f"got {type(value).__name__}", fix))
    for key in ODPO_KEYS:
        if value.get(key) is None:
            problem = f"missing (row has keys {sorted(value)})"
            return RawRow(row.location, rejection=Rejection("missing_field", key, problem, fix))
    reward = value["reward"]
    if not isinstance(value["prompt"], str) or not isinstance(value["text"], str):
        key = "prompt" if not isinstance(value["prompt"], str) else "text"
        problem = f"expected a string, got {type(value[key]).__name__}"
        return RawRow(row.location, rejection=Rejection("wrong_type", key, problem, fix))
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        problem = f"expected a finite number, got {reward!r:.40}"
        return RawRow(row.location, rejection=Rejection("wrong_type", "reward", problem, fix))
    return None


def _group_to_row(prompt: str, group: _Group, pairing: str, fields: FieldNames) -> RawRow:
    n = len(group.texts)
    if n < 2:
        problem = f"the prompt {prompt!r:.60} has {n} sample; a pair needs two"
        fix = "sample at least two continuations per prompt (this prompt is skipped)"
        return RawRow(group.location, rejection=Rejection("too_few_samples", "prompt", problem, fix))
    row, reason = pair_samples(prompt, group.texts, group.rewards, pairing)
    if row is not None:
        value = {fields.prompt: prompt, fields.chosen: row["chosen"], fields.rejected: row["rejected"]}
        value |= {"chosen_score": row["chosen_score"], "rejected_score": row["rejected_score"], "num_samples": n}
        return RawRow(group.location, value)
    which = "first two" if pairing == "first_two" else "best and worst"
    skip = "the prompt is skipped"
    if reason == SKIP_TIED:
        fix = f"nothing to prefer, {skip} (re-score its samples to keep it)"
        rejection = Rejection("tied_rewards", "reward", f"the {which} of its {n} samples have the same reward", fix)
    elif reason == SKIP_EMPTY:
        first_two = pairing == "first_two"
        problem = "one of its first two samples is empty" if first_two else f"at most one of {n} samples is non-empty"
        rejection = Rejection("empty_response", "text", problem, f"{skip}; re-sample it to keep it")
    else:
        assert reason == SKIP_IDENTICAL, reason
        rejection = Rejection("identical_responses", "text", f"the {which} samples have the same text", skip)
    return RawRow(group.location, rejection=rejection)


# DataModule -----------------------------------------------------------------------------------------------


class IMDBDataModule(PreferenceDataModule):
    """IMDB sentiment preference data: plain pairs, or ODPO's sample files converted to pairs.

    Args:
        format: ``pairs`` (rows with ``prompt``/``chosen``/``rejected``, e.g. the sentiment builder's output)
            or ``odpo`` (``imdb-sft-{split}.jsonl`` lines ``{prompt, text, reward}``, grouped by prompt).
        pairing: for ``odpo``, ``first_two`` (ODPO's rule, the paper's data) or ``best_worst``.
        separator: for ``odpo``, put between a prompt and a continuation that lacks its leading space
            (see the module docstring); ``""`` keeps ODPO's texts as they are.
        use_chat_template: plain text continuations by default, as the IMDB SFT models were trained.
        **kwargs: every option of :class:`PreferenceDataModule` (``train_file``, ``max_length``, ...).
    """

    def __init__(
        self,
        format: str = "pairs",
        pairing: str = "first_two",
        separator: str = " ",
        use_chat_template: bool = False,
        **kwargs: Any,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r} is unknown: use one of {', '.join(FORMATS)}.")
        if pairing not in PAIRINGS:
            raise ValueError(f"data.pairing={pairing!r} is unknown: use one of {', '.join(PAIRINGS)}.")
        super().__init__(use_chat_template=use_chat_template, **kwargs)
        self.format, self.pairing, self.separator = format, pairing, separator

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterable[RawRow]:
        """``odpo``: one pair (or one rejection) per prompt, see :func:`odpo_pairs`; ``pairs``: unchanged."""
        if self.format == "pairs":
            return rows
        return odpo_pairs(rows, self.pairing, self.fields, self.separator)
