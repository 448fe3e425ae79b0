"""IMDB review-prefix prompts for the sentiment builder (``python -m sparsepo_lightning.builders.sentiment --imdb``).

Reviews of the hub dataset ``stanfordnlp/imdb`` (columns ``text``, ``label``; splits ``train``/``test``/
``unsupervised``; config ``plain_text``) become short prompts: HTML line breaks (``<br />``) become spaces, and the
prompt is the first N whitespace-separated words of the review, with N drawn per review from
``[min_words, max_words]`` by a seeded RNG (DPO/ODPO use 2-8 token prefixes; set ``min_words == max_words`` for a
fixed length). Duplicate prompts are dropped (first kept) and a seeded sample of ``num_prompts`` is returned.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from typing import Any

from sparsepo_lightning.data.readers import iter_hub
from sparsepo_lightning.data.rows import RawRow

log = logging.getLogger(__name__)

HUB_DATASET = "stanfordnlp/imdb"
HUB_CONFIG = "plain_text"

_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review(text: str) -> str:
    """Replace HTML line breaks (``<br />``, ``<br/>``, ``<br>``) by spaces and collapse runs of whitespace."""
    return " ".join(_LINE_BREAK.sub(" ", text).split())


def review_prefix(text: str, num_words: int) -> str:
    """The first `num_words` whitespace-separated words of the cleaned review (fewer if it is shorter)."""
    return " ".join(clean_review(text).split()[:num_words])


def prefixes(reviews: Iterable[str], min_words: int = 2, max_words: int = 8, seed: int = 0) -> list[str]:
    """Distinct prefixes of `reviews`, in review order.

    Review ``i`` is cut to N words, N being the ``i``-th draw of ``random.Random(seed).randint(min_words,
    max_words)``, so a review's prompt depends only on its position and the seed. Empty reviews and repeated
    prefixes are dropped (the first occurrence is kept) and counted in the log.

    Raises:
        ValueError: ``not 1 <= min_words <= max_words``.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"min_words={min_words}, max_words={max_words}: need 1 <= min_words <= max_words.")
    rng = random.Random(seed)
    kept: dict[str, None] = {}  # insertion-ordered set
    empty = duplicate = 0
    for text in reviews:
        prompt = review_prefix(text, rng.randint(min_words, max_words))
        if not prompt:
            empty += 1
        elif prompt in kept:
            duplicate += 1
        else:
            kept[prompt] = None
    log.info("IMDB prompts: %d distinct, %d empty reviews and %d repeated prefixes dropped", len(kept), empty,
             duplicate)
    return list(kept)


def imdb_prompts(
    hub_dataset: str = HUB_DATASET,
    split: str = "train",
    num_prompts: int | None = None,
    min_words: int = 2,
    max_words: int = 8,
    seed: int = 0,
    hub_config: str | None = HUB_CONFIG,
    hub_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Short review-prefix prompts from an IMDB split (see :func:`prefixes`).

    Args:
        hub_dataset: hub id, or a local folder in the hub layout (``plain_text/train-00000-of-00001.parquet``
            plus the dataset card's ``configs``), read with ``readers.iter_hub``.
        split: ``train``, ``test`` or ``unsupervised``.
        num_prompts: how many distinct prompts to return, sampled with ``random.Random(seed)`` (in sampled
            order); ``None`` returns all of them in review order.
        min_words: shortest prefix, in words.
        max_words: longest prefix, in words.
        seed: seeds the prefix lengths and the sample.
        hub_config: dataset configuration (``plain_text``).
        hub_kwargs: passed on to ``datasets.load_dataset``.

    Raises:
        ValueError: a row without a string ``text``, or more prompts asked for than there are.
    """
    rows = iter_hub(hub_dataset, hub_config, split, **(hub_kwargs or {}))
    prompts = prefixes((_review_text(row) for row in rows), min_words, max_words, seed)
    if num_prompts is None:
        return prompts
    if not 1 <= num_prompts <= len(prompts):
        raise ValueError(
            f"num_prompts={num_prompts}: {hub_dataset}[{split}] gives {len(prompts)} distinct prompts. "
            "Fix: ask for at most that many, or use a larger split (e.g. unsupervised)."
        )
    return random.Random(seed).sample(prompts, num_prompts)


def _review_text(row: RawRow) -> str:
    text = row.value.get("text") if isinstance(row.value, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{row.location}: expected an IMDB row with a string 'text' column, got {row.value!r:.80}.")
    return text
