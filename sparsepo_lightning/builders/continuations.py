"""Seeded sampling of plain-text continuations, shared by the pair builders (sentiment and code)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.generation import SamplingOptions, decode_until_special, seeded_generate


@dataclass(frozen=True)
class SamplingConfig(SamplingOptions):
    """How the pair builders sample continuations: at least 2 per prompt (a pair needs two), temperature > 0."""

    max_new_tokens: int = 24
    batch_size: int = 32

    min_samples: ClassVar[int] = 2
    greedy_allowed: ClassVar[bool] = False


def sample_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: SamplingConfig,
    seed: int,
    stop_strings: Sequence[str] = (),
) -> list[list[str]]:
    """Sample `config.num_samples` plain-text continuations for each prompt in one batched `generate` call.

    Prompts are tokenized without a chat template (the tokenizer's own special tokens, e.g. BOS, are kept)
    and left-padded. Each continuation is cut at its first special token and decoded without it.
    Sampling runs under `torch.manual_seed(seed)` inside `torch.random.fork_rng`, so the caller's RNG state
    is left untouched.

    Args:
        stop_strings: a sequence stops generating once its text contains one of these (e.g. ``"\nassert "``
            for code); the stop string itself is kept in the returned text, callers cut it if they wish.

    Returns:
        One list of `num_samples` strings per prompt.
    """
    new_tokens = seeded_generate(
        model, tokenizer, [tokenizer(p)["input_ids"] for p in prompts], seed, config.num_samples,
        config.max_new_tokens, stop_strings, do_sample=True, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p,
    )  # (len(prompts) * num_samples, <= max_new_tokens)
    texts = [decode_until_special(tokenizer, ids) for ids in new_tokens]
    n = config.num_samples
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
