"""Turn one :class:`PreferencePair` into token ids and labels (TRL-style, docs/method.md §6.1).

Each conversation (prompt + response) is rendered once and tokenised as one string. The prompt/response
boundary is the longest common prefix of the prompt's ids (tokenised alone) and the full ids, so a tokenizer
that merges characters across the boundary cannot shift the labels: the merged token simply counts as
response. BOS is added once (if the tokenizer normally adds one), EOS is appended to each response unless
it already ends with it, then the "keep_end" truncation of docs/method.md §6.1 is applied.

A response with character spans (``PreferencePair.chosen_spans`` / ``rejected_spans``) also gets per-token
weights: the full text is tokenised once with the fast tokenizer's offsets, and a response token takes the
largest weight of the spans its characters intersect. Pairs without spans take the plain path unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from sparsepo_lightning.data.rows import Messages, PreferencePair, Spans, Text, UnpairedExample
from sparsepo_lightning.errors import ConfigError, DataError
from sparsepo_lightning.types import IGNORE_INDEX

_SIDES = ("chosen", "rejected")


class EmptyResponseError(DataError):
    """A response has no token left to train on (e.g. it tokenised to nothing and the tokenizer has no EOS)."""

    reason = "empty_response"


class SpanError(DataError):
    """A response's character spans cannot be placed on its tokens (e.g. the chat template changes the text)."""

    reason = "bad_spans"


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    use_chat_template: bool = False,
    add_bos: bool | None = None,
    prompt_variants: Mapping[str, str] | None = None,
) -> dict[str, list[int] | list[float] | int]:
    """Token ids and labels of both responses of one pair (and per-token span weights where it has spans).

    Args:
        pair: a validated pair; chat messages anywhere in it imply the chat template.
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        max_length: maximum tokens of prompt + response per row.
        max_prompt_length: the prompt is cut from the left to this many tokens (a leading BOS is kept)
            when prompt + longest response exceeds ``max_length``; must be smaller than ``max_length``.
        use_chat_template: render plain-text pairs with ``tokenizer.apply_chat_template`` too (the prompt
            becomes one user message and each response one assistant message).
        add_bos: ``None`` adds one BOS when the tokenizer normally starts sequences with it; ``True`` always
            adds the tokenizer's BOS (error if it has none); ``False`` never adds one.
        prompt_variants: ``{name: template}`` (``prompt_variants.py``): each variant prompt is rendered, tokenised
            alone (with the BOS rule above) and cut from the left to ``max_length −`` the longest kept response, so
            that ``[variant prompt | response]`` fits ``max_length`` with every response token kept.

    Returns:
        ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (lists of
        equal length per side, at most ``max_length``; labels are ``IGNORE_INDEX`` on prompt tokens and equal
        to the ids on response tokens), plus the counters ``prompt_truncated`` and ``response_truncated``
        (0 or 1). A side with spans also gets ``{side}_span_weights`` (floats) and ``{side}_span_covered``
        (0/1), aligned with its ids and truncated with them: the largest weight of the spans a token's characters
        intersect, 0 / 0 on prompt tokens, BOS, an appended EOS and tokens outside every span. A side without
        spans gets neither key.

    Raises:
        ValueError: invalid lengths, or chat messages without a chat template on the tokenizer.
        ConfigError: spans with a slow tokenizer (no offsets mapping).
        EmptyResponseError: a response would have no labelled token.
        SpanError: spans that cannot be placed on the rendered text (or were not validated, see ``load_pairs``).
    """
    features = _tokenize(pair, _SIDES, tokenizer, max_length, max_prompt_length, use_chat_template, add_bos)
    if prompt_variants:
        features.update(_variant_prompts(pair, features, prompt_variants, tokenizer, max_length, use_chat_template,
                                         add_bos))
    return features


def _variant_prompts(pair: PreferencePair, features: dict[str, Any], templates: Mapping[str, str], tokenizer: Any,
                     max_length: int, use_chat_template: bool, add_bos: bool | None) -> dict[str, list[int] | int]:
    """``variant_<name>_prompt_ids`` of each template and ``variant_prompt_truncated`` (see ``tokenize_pair``)."""
    from sparsepo_lightning.prompt_variants import render_prompt

    bos_to_add = _bos_to_add(tokenizer, add_bos)
    longest = max(sum(label != IGNORE_INDEX for label in features[f"{side}_labels"]) for side in _SIDES)
    budget = max_length - longest
    out: dict[str, list[int] | int] = {"variant_prompt_truncated": 0}
    for name, template in templates.items():
        variant = dataclasses.replace(pair, prompt=render_prompt(pair.prompt, template))
        prompt_text, _ = _render(variant, tokenizer, use_chat_template)
        ids = _encode(tokenizer, prompt_text, bos_to_add)
        if len(ids) > budget:
            ids = _keep_end(ids, budget, None if add_bos is False else tokenizer.bos_token_id) if budget else []
            out["variant_prompt_truncated"] = 1
        out[f"variant_{name}_prompt_ids"] = ids
    return out


def tokenize_example(
    example: UnpairedExample,
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    use_chat_template: bool = False,
    add_bos: bool | None = None,
) -> dict[str, list[int] | int | bool]:
    """Token ids and labels of one unpaired example (prompt + completion), tokenised exactly as one response of
    :func:`tokenize_pair` (same rendering, BOS/EOS and boundary rules); the "keep_end" truncation looks at this
    completion alone. Arguments as for ``tokenize_pair``.

    Returns:
        ``input_ids``, ``labels`` (``IGNORE_INDEX`` on prompt tokens), ``desirable`` (the example's label) and the
        counters ``prompt_truncated`` and ``response_truncated`` (0 or 1).

    Raises:
        EmptyResponseError: the completion would have no labelled token.
    """
    pair = PreferencePair(example.prompt, example.completion, example.completion, source=example.source)
    try:
        features = _tokenize(pair, ("chosen",), tokenizer, max_length, max_prompt_length, use_chat_template, add_bos)
    except EmptyResponseError as e:  # the example's completion is tokenised as the "chosen" side of a pair
        raise EmptyResponseError(str(e).replace("the chosen response", "the completion", 1)) from None
    return {"input_ids": features["chosen_input_ids"], "labels": features["chosen_labels"],
            "desirable": example.desirable, "prompt_truncated": features["prompt_truncated"],
            "response_truncated": features["response_truncated"]}


def _tokenize(
    pair: PreferencePair,
    sides: tuple[str, ...],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    add_bos: bool | None,
) -> dict[str, list[int] | list[float] | int]:
    """``tokenize_pair`` for the responses ``sides`` of ``pair`` (``("chosen",)``: one unpaired example)."""
    _check_lengths(max_length, max_prompt_length)
    prompt_text, full_texts = _render(pair, tokenizer, use_chat_template)
    bos_to_add = _bos_to_add(tokenizer, add_bos)
    prompt_ids = _encode(tokenizer, prompt_text, bos_to_add)
    spans = _full_text_spans(pair, prompt_text, full_texts, _is_chat(pair, use_chat_template))
    tokens, weights = {}, {}
    for side in sides:
        if side in spans:
            full_ids, offsets = _encode_with_offsets(tokenizer, full_texts[side], bos_to_add, pair.source)
        else:
            full_ids = _encode(tokenizer, full_texts[side], bos_to_add)
        boundary = common_prefix_length(prompt_ids, full_ids)
        response = _with_eos(full_ids[boundary:], tokenizer.eos_token_id)
        tokens[side] = (full_ids[:boundary], response)
        if side in spans:  # aligned with the response; an appended EOS gets 0, 0
            values, covered = _token_weights(offsets[boundary:], spans[side])
            extra = len(response) - len(values)
            weights[side] = (values + [0.0] * extra, covered + [0] * extra)
    tokens, prompt_cut, response_cut = _truncate(
        tokens, max_length, max_prompt_length, None if add_bos is False else tokenizer.bos_token_id
    )
    features: dict[str, list[int] | list[float] | int] = {}
    for side, (prompt, response) in tokens.items():
        if not response:
            raise EmptyResponseError(
                f"{pair.source}: the {side} response has no token to train on (it tokenised to nothing and the "
                "tokenizer has no EOS token to append). Fix: remove the row or give the tokenizer an eos_token."
            )
        features[f"{side}_input_ids"] = prompt + response
        features[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
        if side in weights:  # truncation keeps a prefix of the response; prompt tokens are all 0
            values, covered = weights[side]
            features[f"{side}_span_weights"] = [0.0] * len(prompt) + values[: len(response)]
            features[f"{side}_span_covered"] = [0] * len(prompt) + covered[: len(response)]
    features["prompt_truncated"] = int(prompt_cut)
    features["response_truncated"] = int(response_cut)
    return features


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} and max_length={max_length}: need "
            "1 <= max_prompt_length < max_length so that every response keeps at least one token. "
            "Fix: lower max_prompt_length or raise max_length."
        )


def _render(pair: PreferencePair, tokenizer: Any, use_chat_template: bool) -> tuple[str, dict[str, str]]:
    """The prompt text (with generation prompt for chat) and the full text of each side."""
    responses = {"chosen": pair.chosen, "rejected": pair.rejected}
    if not _is_chat(pair, use_chat_template):
        return pair.prompt, {side: pair.prompt + text for side, text in responses.items()}
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{pair.source}: this pair uses chat messages (or use_chat_template=True) but the tokenizer has no "
            "chat_template. Fix: use a tokenizer with a chat template, set tokenizer.chat_template, or store "
            "prompt/chosen/rejected as plain strings with use_chat_template=False."
        )
    prompt = _as_messages(pair.prompt, "user")
    prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True) if prompt else ""
    full = {
        side: _apply_template(tokenizer, prompt + _as_messages(text, "assistant")) for side, text in responses.items()
    }
    return prompt_text, full


def _is_chat(pair: PreferencePair, use_chat_template: bool) -> bool:
    return use_chat_template or any(isinstance(t, list) for t in (pair.prompt, pair.chosen, pair.rejected))


def _as_messages(text: Text, role: str) -> Messages:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def _apply_template(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _bos_to_add(tokenizer: Any, add_bos: bool | None = None) -> int | None:
    """The BOS id to put in front of every row (``None``: none), see ``tokenize_pair``'s ``add_bos``."""
    bos = tokenizer.bos_token_id
    if add_bos is False:
        return None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token. Fix: set add_bos to null or false.")
    if add_bos or bos is None:
        return bos
    ids = tokenizer("x").input_ids
    return bos if ids and ids[0] == bos else None


def _encode(tokenizer: Any, text: str, bos_to_add: int | None) -> list[int]:
    """Ids without special tokens, then exactly one leading BOS when the tokenizer uses one."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids) if text else []
    if bos_to_add is not None and (not ids or ids[0] != bos_to_add):
        ids.insert(0, bos_to_add)
    return ids


def _encode_with_offsets(
    tokenizer: Any, text: str, bos_to_add: int | None, source: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """``_encode``'s ids plus each token's ``(start, end)`` characters in ``text`` (``(0, 0)`` for an added BOS)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{source}: this pair has character spans, which need the token offsets only a fast tokenizer gives, "
            f"but {type(tokenizer).__name__} is a slow one. Fix: load the tokenizer with use_fast=True (a "
            "PreTrainedTokenizerFast), or remove the chosen_spans/rejected_spans columns."
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded.input_ids), [(int(a), int(b)) for a, b in encoded.offset_mapping]
    if bos_to_add is not None and (not ids or ids[0] != bos_to_add):
        ids.insert(0, bos_to_add)
        offsets.insert(0, (0, 0))
    return ids, offsets


def _full_text_spans(
    pair: PreferencePair, prompt_text: str, full_texts: dict[str, str], is_chat: bool
) -> dict[str, Spans]:
    """Each side's spans moved from response-text offsets to offsets in its full rendered text.

    Plain text: the response starts at ``len(prompt_text)``. Chat: its (single) message content is searched in
    the full text after the part it shares with the prompt text; a template that trims the content is allowed
    (spans are clipped to the trimmed content), any other change raises ``SpanError``.
    """
    out = {}
    for side in _SIDES:
        spans, response = getattr(pair, f"{side}_spans"), getattr(pair, side)
        if spans is None:
            continue
        if isinstance(response, list) and len(response) != 1:
            raise SpanError(f"{pair.source}: {side}_spans need a plain-text {side} response or one chat message, "
                            f"not {len(response)}. Fix: drop the spans or store the response as one message.")
        text = response if isinstance(response, str) else response[0]["content"]
        if any(not 0 <= s < e <= len(text) for s, e, _ in spans) or any(
            a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)
        ):
            raise SpanError(f"{pair.source}: {side}_spans {list(spans)[:4]} are out of range, unsorted or "
                            "overlapping. Fix: read the pairs with load_pairs, which checks them and names the row.")
        start, lead, length = len(prompt_text), 0, len(text)
        if is_chat:
            start, lead, length = _locate_content(full_texts[side], prompt_text, text)
            if start < 0:
                raise SpanError(
                    f"{pair.source}: the {side} response's text does not appear in its chat-template rendering, so "
                    f"its {side}_spans cannot be placed on tokens. Fix: use a chat template that writes the message "
                    f"content unchanged, or remove {side}_spans from this row."
                )
        clipped = ((max(s - lead, 0), min(e - lead, length), w) for s, e, w in spans)
        out[side] = tuple((start + s, start + e, w) for s, e, w in clipped if s < e)
    return out


def _locate_content(full: str, prompt_text: str, content: str) -> tuple[int, int, int]:
    """``(start, lead, length)``: where ``content`` (or, if the template trimmed it, its stripped form) begins in
    ``full`` after the characters ``full`` shares with ``prompt_text``; ``lead`` is the number of leading characters
    trimmed and ``length`` the length found. ``start`` is -1 when neither form is there."""
    after = len(os.path.commonprefix([prompt_text, full]))
    start = full.find(content, after)
    if start >= 0 or not content.strip():
        return start, 0, len(content)
    stripped = content.strip()
    return full.find(stripped, after), len(content) - len(content.lstrip()), len(stripped)


def _token_weights(offsets: list[tuple[int, int]], spans: Spans) -> tuple[list[float], list[int]]:
    """Per token: the largest weight of the spans its characters ``[a, b)`` intersect, and 1 if any (else 0, 0).

    ``spans`` are sorted and non-overlapping, so their ends are sorted too: the spans that intersect ``[a, b)``
    are exactly those with ``end > a`` and ``start < b``, a contiguous range found by bisection.
    """
    starts, ends = [s for s, _, _ in spans], [e for _, e, _ in spans]
    values, covered = [], []
    for a, b in offsets:
        first, stop = bisect_right(ends, a), bisect_left(starts, b)
        hit = a < b and first < stop
        values.append(max(spans[i][2] for i in range(first, stop)) if hit else 0.0)
        covered.append(int(hit))
    return values, covered


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id rows."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _with_eos(response: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not response or response[-1] != eos):
        return [*response, eos]
    return response


def _truncate(
    sides: dict[str, tuple[list[int], list[int]]], max_length: int, max_prompt_length: int, bos: int | None
) -> tuple[dict[str, tuple[list[int], list[int]]], bool, bool]:
    """TRL "keep_end": cut prompts from the left, then responses to ``max_length - len(prompt)``.

    Both steps trigger on ``len(prompt) + longest response > max_length`` (longest over chosen/rejected),
    as in docs/method.md §6.1, so chosen and rejected keep the same prompt.

    Returns:
        ``(sides, prompt_truncated, response_truncated)``.
    """
    longest = max(len(response) for _, response in sides.values())
    prompt_cut = response_cut = False
    out = {}
    for side, (prompt, response) in sides.items():
        if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
            prompt = _keep_end(prompt, max_prompt_length, bos)
            prompt_cut = True
        if len(prompt) + longest > max_length:
            budget = max_length - len(prompt)
            response_cut |= len(response) > budget
            response = response[:budget]
        out[side] = (prompt, response)
    return out, prompt_cut, response_cut


def _keep_end(prompt: list[int], max_prompt_length: int, bos: int | None) -> list[int]:
    """The last ``max_prompt_length`` tokens, keeping a leading BOS in front of them."""
    if bos is not None and prompt[0] == bos:
        tail = max_prompt_length - 1
        return [bos, *prompt[len(prompt) - tail :]] if tail else [bos]
    return prompt[-max_prompt_length:]
