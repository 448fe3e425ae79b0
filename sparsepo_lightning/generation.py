"""Seeded, batched ``generate`` shared by the pair builders (sentiment, code) and the evaluation commands.

One place decides how prompts are padded, which ids stop a sequence, how the RNG is scoped and how sampled ids
are decoded, so a builder and an evaluation sampling the same prompts with the same seed draw the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.errors import ConfigError


@dataclass(frozen=True)
class SamplingOptions:
    """How continuations are sampled; subclasses set their defaults and limits (pair builders, evaluation)."""

    num_samples: int = 4
    """Continuations sampled per prompt."""
    max_new_tokens: int = 48
    """Maximum length of each continuation, in tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding where ``greedy_allowed``."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables top-k (overriding the model's generation_config)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables top-p."""
    batch_size: int = 8
    """Prompts per ``generate`` call; each expands to ``num_samples`` sequences."""
    seed: int = 0
    """Batch i of the prompt list is sampled under ``torch.manual_seed(seed + i)``."""

    min_samples: ClassVar[int] = 1
    greedy_allowed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        temperature = (self.temperature >= 0, ">= 0 (0 = greedy)") if self.greedy_allowed else (
            self.temperature > 0, "> 0")
        checks = {
            "num_samples": (self.num_samples >= self.min_samples, f">= {self.min_samples}"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "temperature": temperature,
            "top_k": (self.top_k >= 0, ">= 0 (0 disables top-k)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"{self.option_name(name)}={getattr(self, name)!r} is invalid: it must be {rule}.")

    def option_name(self, field_name: str) -> str:
        """How the user spells an option in error messages."""
        return f"{type(self).__name__}.{field_name}"


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
