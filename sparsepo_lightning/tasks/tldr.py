"""TL;DR summarisation preferences (``openai/summarize_from_feedback``) -> plain-text pairs (docs/method.md §6.4).

Prompt of a Reddit post / a CNN-DailyMail article (``info.post`` is null, ``info.article`` set)::

    SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:
    ARTICLE: {article}\\nTL;DR:

Responses are ``" " + summary.strip()``, so ``prompt + response`` reads ``...TL;DR: <summary>``.

Two subsets:

- ``comparisons`` (splits ``train``, ``validation``): one row per human comparison of two summaries,
  ``choice`` (0/1) naming the preferred one. One row -> one pair.
- ``axis`` (splits ``validation``, ``test``): one row per summary rated on a 1-7 Likert scale
  (``summary.axes.overall``, plus accuracy / coverage / coherence). Pairing rule (ours; the released code does
  not show one, docs/method.md §6.4): group rows by post (``info.id``); a summary's score is the mean
  ``overall`` over the workers who rated the same text (stripped); every two distinct summaries of a post
  with different scores make one pair, the higher-scored one chosen. Ties (``tied_rating``), posts with a
  single distinct summary (``single_summary``) and rows without an ``overall`` rating (``missing_rating``)
  are counted in the report, so for ``axis`` the report counts candidate pairs and posts, not input rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.rows import RawRow, Rejection

TLDR_HUB_ID = "openai/summarize_from_feedback"
TLDR_PARQUET_REVISION = "refs/convert/parquet"
"""The hub's automatic Parquet export: the repository's main branch only has a loading script, which
``datasets`` >= 4 no longer runs. The export is laid out ``{comparisons,axis}/{split}/NNNN.parquet``."""
_SUBSET_SPLITS = {"comparisons": ("train", "validation"), "axis": ("validation", "test")}


class BadRow(Exception):
    """A row cannot be converted; ``rejection`` says why (the module counts it in the report)."""

    def __init__(self, reason: str, field_name: str | None, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.rejection = Rejection(reason, field_name, problem, fix)


def tldr_prompt(info: Any) -> str:
    """The summarisation prompt of one ``info`` record (a Reddit post, or a news article when ``post`` is null).

    Raises:
        BadRow: neither a post (with subreddit and title) nor an article.
    """
    if not isinstance(info, dict):
        raise BadRow("wrong_type", "info", f"expected an object, got {type(info).__name__}", "check the schema")
    if isinstance(info.get("post"), str):
        for key in ("subreddit", "title"):
            if not isinstance(info.get(key), str):
                raise BadRow("missing_field", f"info.{key}", "missing for a Reddit post", "fill it in or drop the row")
        subreddit, title, post = (info[key].strip() for key in ("subreddit", "title", "post"))
        return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
    if isinstance(info.get("article"), str):
        return f"ARTICLE: {info['article'].strip()}\nTL;DR:"
    problem = "neither 'post' nor 'article' is a string, so there is no text to summarise"
    raise BadRow("missing_field", "info.post", problem, "fill in info.post (Reddit) or info.article (news)")


def _summary_text(summary: Any, name: str) -> str:
    if not isinstance(summary, dict) or not isinstance(summary.get("text"), str):
        raise BadRow("missing_field", f"{name}.text", "no summary text", "give every summary a 'text' string")
    return " " + summary["text"].strip()


def comparison_to_pair(value: Any) -> dict[str, str]:
    """``{prompt, chosen, rejected}`` of one ``comparisons`` row (empty or identical summaries pass through
    to the generic validator, which counts them).

    Raises:
        BadRow: a malformed row, or ``choice`` not 0/1 (``bad_choice``).
    """
    if not isinstance(value, dict):
        raise BadRow("wrong_type", None, f"expected an object, got {type(value).__name__}", "check the schema")
    prompt = tldr_prompt(value.get("info"))
    summaries, choice = value.get("summaries"), value.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        problem = f"expected a list of 2 summaries, got {str(summaries)[:60]!r}"
        raise BadRow("wrong_type", "summaries", problem, "give exactly two summaries per comparison")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise BadRow("bad_choice", "choice", f"expected 0 or 1, got {choice!r}", "set choice to the preferred index")
    texts = [_summary_text(s, f"summaries[{i}]") for i, s in enumerate(summaries)]
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}


@dataclass
class _RatedSummary:
    text: str
    location: str
    ratings: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(self.ratings) / len(self.ratings)


@dataclass
class _Post:
    prompt: str
    location: str
    summaries: dict[str, _RatedSummary] = field(default_factory=dict)


def axis_rows_to_pairs(rows: Iterable[RawRow]) -> Iterator[RawRow]:
    """Pairs (and rejections) from ``axis`` rows by the pairing rule of the module docstring.

    Reads every row first (pairs need all ratings of a post). Bad rows are yielded as rejections at once;
    then, post by post in order of first appearance, one row per candidate pair of distinct summaries
    (``"<location of a> vs <location of b>"``, ``a`` appearing first) or one ``single_summary`` rejection.
    """
    posts: dict[str, _Post] = {}
    for row in rows:
        if row.decode_error is not None:
            yield row
            continue
        try:
            post_id, prompt, text, overall = _axis_fields(row.value)
        except BadRow as e:
            yield RawRow(row.location, rejection=e.rejection)
            continue
        post = posts.setdefault(post_id, _Post(prompt, row.location))
        post.summaries.setdefault(text, _RatedSummary(text, row.location)).ratings.append(overall)
    for post_id, post in posts.items():
        yield from _post_pairs(post_id, post)


def _axis_fields(value: Any) -> tuple[str, str, str, float]:
    """``(post id, prompt, " " + summary text, overall rating)`` of one ``axis`` row."""
    if not isinstance(value, dict):
        raise BadRow("wrong_type", None, f"expected an object, got {type(value).__name__}", "check the schema")
    info = value.get("info")
    prompt = tldr_prompt(info)
    if info.get("id") is None:
        raise BadRow("missing_field", "info.id", "missing, so the row cannot be grouped with its post", "fill it in")
    summary = value.get("summary")
    text = _summary_text(summary, "summary")
    axes = summary.get("axes")
    overall = axes.get("overall") if isinstance(axes, dict) else None
    if not isinstance(overall, int | float) or isinstance(overall, bool):
        problem = f"expected a number, got {overall!r}"
        raise BadRow("missing_rating", "summary.axes.overall", problem, "rate the summary or drop the row")
    return str(info["id"]), prompt, text, float(overall)


def _post_pairs(post_id: str, post: _Post) -> Iterator[RawRow]:
    summaries = list(post.summaries.values())
    if len(summaries) == 1:
        problem = f"post {post_id!r} has a single distinct summary, so it gives no pair"
        fix = "nothing to fix (the post is unusable for pairs); add another rated summary to use it"
        yield RawRow(post.location, rejection=Rejection("single_summary", "summary.text", problem, fix))
        return
    for a, b in itertools.combinations(summaries, 2):
        location = f"{a.location} vs {b.location}"
        if a.score == b.score:
            problem = f"both summaries of post {post_id!r} score overall={a.score:g}, so neither is preferred"
            yield RawRow(location, rejection=Rejection("tied_rating", "summary.axes.overall", problem, "none needed"))
            continue
        chosen, rejected = (a, b) if a.score > b.score else (b, a)
        yield RawRow(location, {"prompt": post.prompt, "chosen": chosen.text, "rejected": rejected.text})


class TLDRDataModule(PreferenceDataModule):
    """TL;DR preference pairs from ``openai/summarize_from_feedback``, a local folder in its layout, or files.

    Hub defaults: ``datasets`` >= 4 cannot run the repository's loading script, so the module reads the hub's
    Parquet export, ``hub_kwargs = {revision: refs/convert/parquet, data_dir: <subset>}`` (``data_dir`` alone
    for any other ``hub_dataset``, e.g. a local folder laid out ``<subset>/<split>/*.jsonl|parquet``). Given
    ``hub_kwargs`` are merged over these defaults. Splits: ``comparisons`` has ``train``/``validation``,
    ``axis`` has ``validation``/``test``::

        data:
          class_path: sparsepo_lightning.tasks.tldr.TLDRDataModule
          init_args: {subset: axis, train_split: validation, val_split: test}

    The pairs are plain text (``prompt + " " + summary``), trained without a chat template by default; set
    ``use_chat_template: true`` (or ``system_prompt``) to wrap them in one as the reference code did
    (docs/method.md §6.1).

    Args:
        subset: ``comparisons`` (one pair per human comparison) or ``axis`` (pairs from Likert ratings, see
            the module docstring for the pairing rule).
        hub_dataset: hub id or local folder in the hub's layout. Setting ``train_file`` replaces the default
            hub id; any other value with ``train_file`` is an error.
        hub_kwargs: more ``datasets.load_dataset`` arguments, merged over the defaults above.
        train_split: hub split used for training.
        val_split: hub split used for validation.
        system_prompt: render every pair as chat messages, ``[system, user prompt]`` + assistant response,
            with this system message (``""`` as in the reference code); ``None`` keeps plain text.
        **kwargs: every other :class:`PreferenceDataModule` option (``tokenizer``, ``max_length``...).
    """

    def __init__(
        self,
        subset: Literal["comparisons", "axis"] = "comparisons",
        hub_dataset: str | None = TLDR_HUB_ID,
        hub_kwargs: dict[str, Any] | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        if subset not in _SUBSET_SPLITS:
            raise ValueError(f"data.subset={subset!r}: must be 'comparisons' or 'axis'.")
        if kwargs.get("train_file") and hub_dataset == TLDR_HUB_ID:
            hub_dataset = None  # a local training file replaces the *default* hub dataset
        defaults: dict[str, Any] = {"data_dir": subset}
        if hub_dataset == TLDR_HUB_ID:
            defaults["revision"] = TLDR_PARQUET_REVISION
        hub_kwargs = {**defaults, **(hub_kwargs or {})} if hub_dataset else hub_kwargs
        super().__init__(
            hub_dataset=hub_dataset, hub_kwargs=hub_kwargs, train_split=train_split, val_split=val_split, **kwargs
        )
        self.subset, self.system_prompt = subset, system_prompt
        available = _SUBSET_SPLITS[subset]
        if hub_dataset == TLDR_HUB_ID and not {train_split, val_split} - {None} <= set(available):
            raise ValueError(
                f"data.train_split={train_split!r}, data.val_split={val_split!r}: the {subset} subset of "
                f"{TLDR_HUB_ID} has the splits {', '.join(available)}. Fix: set train_split: {available[0]} and "
                f"val_split: {available[1]} (or null)."
            )

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterator[RawRow]:
        """Hub-schema rows (``comparisons`` or ``axis``, per ``subset``) -> ``{prompt, chosen, rejected}`` text."""
        pairs = axis_rows_to_pairs(rows) if self.subset == "axis" else self._comparison_pairs(rows)
        for row in pairs:
            if self.system_prompt is not None and row.value is not None:
                system = {"role": "system", "content": self.system_prompt}
                prompt = [system, {"role": "user", "content": row.value["prompt"]}]
                row = RawRow(row.location, {**row.value, "prompt": prompt})
            yield row

    @staticmethod
    def _comparison_pairs(rows: Iterable[RawRow]) -> Iterator[RawRow]:
        for row in rows:
            if row.decode_error is not None:
                yield row
                continue
            try:
                yield RawRow(row.location, comparison_to_pair(row.value))
            except BadRow as e:
                yield RawRow(row.location, rejection=e.rejection)
