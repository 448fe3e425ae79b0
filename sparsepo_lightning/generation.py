"""Seeded, batched ``generate`` shared by the pair builders (sentiment, code) and the evaluation commands.

One place decides how prompts are padded, which ids stop a sequence, how the RNG is scoped and how sampled ids
are decoded, so a builder and an evaluation sampling the same prompts with the same seed draw the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def seeded_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    seed: int,
    num_return_sequences: int,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    **sampling: Any,
) -> list[list[int]]:
    """New token ids of ``num_return_sequences`` sequences per prompt, from one left-padded ``generate`` call.

    Runs under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's RNG state is left
    untouched) and ``torch.inference_mode``. Sequences stop at any EOS id of :func:`stop_ids`, or once their text
    contains one of ``stop_strings`` (kept in the output).

    Args:
        sampling: ``generate`` options such as ``do_sample``, ``temperature``, ``top_k``, ``top_p``.

    Returns:
        ``len(prompt_ids) * num_return_sequences`` id lists (prompt-major), each ``<= max_new_tokens`` long and
        padded after the end with the pad id.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(list(prompt_ids), pad_id)
    device = model.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
            eos_token_id=stop_ids(model, tokenizer), **sampling,
            **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
        )
    return output[:, input_ids.shape[1] :].tolist()


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into `(input_ids, attention_mask)`, both of shape (B, max_len)."""
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
    width = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences])
    return input_ids, attention_mask


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer (they can differ, e.g. chat models)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    return list(dict.fromkeys(ids))


def decode_until_special(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Decode `ids` up to (excluding) the first special token: EOS, padding, or a document separator.

    Byte-level tokenizers can split one character over several tokens; when `max_new_tokens` cuts such a
    character, its leading bytes decode to U+FFFD, so we drop those trailing tokens.
    """
    special = set(tokenizer.all_special_ids)
    end = next((i for i, token in enumerate(ids) if token in special), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    while end > 0 and text.endswith("\ufffd"):
        end -= 1
        text = tokenizer.decode(ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text
