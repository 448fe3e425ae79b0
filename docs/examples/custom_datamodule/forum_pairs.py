"""A custom DataModule (docs/custom-datamodule.md): question-and-answer forum rows become preference pairs.

Each row of the forum files is ``{"question": str, "answers": [{"text": str, "votes": int}, ...]}``. The pair is
the question as prompt, its most voted answer as chosen and its least voted as rejected. A row with fewer than two
answers, or whose answers all have the same votes, is refused with a :class:`Rejection` and counted in the data
report, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.data.rows import RawRow, Rejection


class ForumPairs(PreferenceDataModule):
    """Forum threads -> ``{prompt, chosen, rejected}`` pairs (most vs least voted answer).

    Args:
        min_vote_gap: least difference of votes between the chosen and the rejected answer; threads with a smaller
            gap are refused as ``tied_votes``.
        **kwargs: the options of :class:`PreferenceDataModule` (``train_file``, ``val_fraction``, ``max_length``...).
    """

    def __init__(self, min_vote_gap: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)          # train_file, val_fraction, max_length, batch_size, ... as usual
        self.min_vote_gap = min_vote_gap

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterator[RawRow]:
        for row in rows:
            thread = row.value
            if row.decode_error is not None or not isinstance(thread, dict) or "answers" not in thread:
                yield row  # the validator names the problem (bad_json, wrong_type, missing_field)
                continue
            answers = sorted(thread["answers"], key=lambda answer: answer["votes"], reverse=True)
            if len(answers) < 2:
                yield RawRow(row.location, rejection=Rejection(
                    "too_few_answers", "answers", f"{len(answers)} answer(s); a pair needs two",
                    "drop single-answer threads before export, or ignore this count"))
            elif answers[0]["votes"] - answers[-1]["votes"] < self.min_vote_gap:
                yield RawRow(row.location, rejection=Rejection(
                    "tied_votes", "answers", f"the votes differ by less than min_vote_gap={self.min_vote_gap}",
                    "lower data.min_vote_gap, or ignore this count"))
            else:
                yield RawRow(row.location, {"prompt": thread["question"], "chosen": answers[0]["text"],
                                            "rejected": answers[-1]["text"]})
