"""Turn one :class:`PreferencePair` into token ids and labels (TRL-style, docs/method.md §6.1).

Each conversation (prompt + response) is rendered once and tokenised as one string. The prompt/response
boundary is the longest common prefix of the prompt's ids (tokenised alone) and the full ids, so a tokenizer
that merges characters across the boundary cannot shift the labels: the merged token simply counts as
response. BOS is added once (if the tokenizer normally adds one), EOS is appended to each response unless
it already ends with it, then the "keep_end" truncation of docs/method.md §6.1 is applied.
"""

from __future__ import annotations

from typing import Any

from sparsepo_lightning.data.rows import Messages, PreferencePair, Text
from sparsepo_lightning.errors import DataError
from sparsepo_lightning.types import IGNORE_INDEX

_SIDES = ("chosen", "rejected")

ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'user', 'assistant') %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)
"""The Zephyr-style template the released code renders every non-code example with (docs/method.md §6.1):
``<|system|>``, ``<|user|>``, ``<|assistant|>`` blocks, each content followed by the EOS token."""

CHAT_TEMPLATES = {"zephyr": ZEPHYR_CHAT_TEMPLATE}
"""Built-in chat templates by name, for base/SFT models that ship none (Pythia, GPT-J, GPT-2)."""


class EmptyResponseError(DataError):
    """A response has no token left to train on (e.g. it tokenised to nothing and the tokenizer has no EOS)."""


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    use_chat_template: bool = False,
    add_bos: bool | None = None,
) -> dict[str, list[int] | int]:
    """Token ids and labels of both responses of one pair.

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

    Returns:
        ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (lists of
        equal length per side, at most ``max_length``; labels are ``IGNORE_INDEX`` on prompt tokens and equal
        to the ids on response tokens), plus the counters ``prompt_truncated`` and ``response_truncated``
        (0 or 1).

    Raises:
        ValueError: invalid lengths, or chat messages without a chat template on the tokenizer.
        EmptyResponseError: a response would have no labelled token.
    """
    _check_lengths(max_length, max_prompt_length)
    prompt_text, full_texts = _render(pair, tokenizer, use_chat_template)
    bos_to_add = _bos_to_add(tokenizer, add_bos)
    prompt_ids = _encode(tokenizer, prompt_text, bos_to_add)
    sides = {}
    for side in _SIDES:
        full_ids = _encode(tokenizer, full_texts[side], bos_to_add)
        boundary = _common_prefix_length(prompt_ids, full_ids)
        sides[side] = (full_ids[:boundary], _with_eos(full_ids[boundary:], tokenizer.eos_token_id))
    sides, prompt_cut, response_cut = _truncate(
        sides, max_length, max_prompt_length, None if add_bos is False else tokenizer.bos_token_id
    )
    features: dict[str, list[int] | int] = {}
    for side, (prompt, response) in sides.items():
        if not response:
            raise EmptyResponseError(
                f"{pair.source}: the {side} response has no token to train on (it tokenised to nothing and the "
                "tokenizer has no EOS token to append). Fix: remove the row or give the tokenizer an eos_token."
            )
        features[f"{side}_input_ids"] = prompt + response
        features[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
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
    is_chat = use_chat_template or any(isinstance(t, list) for t in (pair.prompt, pair.chosen, pair.rejected))
    if not is_chat:
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


def _common_prefix_length(a: list[int], b: list[int]) -> int:
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
