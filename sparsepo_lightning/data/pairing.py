"""Pairing rules for scored samples of one prompt (chosen vs rejected), shared by the sentiment pair builder and
the IMDB data module (ODPO's sample files)."""

from __future__ import annotations

from collections.abc import Sequence

PAIR_KEYS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
SKIP_EMPTY = "empty"
"""Skip reason: fewer than two non-empty continuations (``first_two``: one of the first two is empty)."""
SKIP_TIED = "tied"
"""Skip reason: the best and worst continuations have the same score."""
SKIP_IDENTICAL = "identical"
"""Skip reason: the best and worst continuations are the same text (possible with a non-deterministic scorer)."""
PAIRINGS = ("best_worst", "first_two")
"""How `pair_samples` picks chosen and rejected among the samples of one prompt."""


def pair_samples(
    prompt: str, texts: Sequence[str], scores: Sequence[float], pairing: str = "best_worst"
) -> tuple[dict | None, str | None]:
    """Make one preference pair from the scored continuations of `prompt`.

    Pairing rules:

    - ``best_worst``: the highest-scored continuation is chosen, the lowest-scored one rejected. Empty
      (whitespace-only) continuations are ignored; ties for best or worst go to the earliest sample.
    - ``first_two``: ODPO's ``imdb_paired_responses`` rule: only the first two samples are used, the higher
      scored one is chosen. Unlike ODPO (which then picks the second sample), a tie gives no pair.

    Returns:
        ``(row, None)`` with a row of `PAIR_KEYS`, or ``(None, reason)`` when the prompt gives no pair
        (`SKIP_EMPTY`, `SKIP_TIED` or `SKIP_IDENTICAL`).

    Raises:
        ValueError: an unknown `pairing`.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is unknown: use one of {', '.join(PAIRINGS)}.")
    scored = list(zip(scores, texts, strict=True))
    if pairing == "first_two":
        scored = scored[:2]
    kept = [(score, text) for score, text in scored if text.strip()]
    if len(kept) < 2:
        return None, SKIP_EMPTY
    best = max(range(len(kept)), key=lambda i: kept[i][0])  # max/min return the first of equal keys
    worst = min(range(len(kept)), key=lambda i: kept[i][0])
    if kept[best][0] == kept[worst][0]:
        return None, SKIP_TIED
    if kept[best][1] == kept[worst][1]:
        return None, SKIP_IDENTICAL
    row = {"prompt": prompt, "chosen": kept[best][1], "rejected": kept[worst][1]}
    row |= {"chosen_score": float(kept[best][0]), "rejected_score": float(kept[worst][0])}
    return row, None
