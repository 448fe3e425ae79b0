"""Batched, seeded sampling that keeps the sampled token ids, and sequence log-probabilities of completions.

Batch ``i`` of the prompt list is sampled under ``torch.manual_seed(seed + i)`` (inside ``fork_rng``), as in the
pair builders, so two models evaluated on the same prompts with the same seed draw from the same random stream:
a model compared with itself produces identical samples.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.chat_templates import CHAT_TEMPLATES
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.evaluate.options import CHAT_TEMPLATE_CHOICES
from sparsepo_lightning.generation import SamplingOptions, decode_until_special, seeded_generate, stop_ids


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    """Decoded up to (excluding) the first special token."""
    prompt_ids: list[int]
    """The prompt as fed to the model (without padding)."""
    ids: list[int]
    """Sampled token ids, up to and including the first EOS (when one was sampled)."""


@dataclass(frozen=True)
class GenerationConfig(SamplingOptions):
    """How completions are sampled by ``sparsepo evaluate``: greedy decoding (temperature 0) allowed, one sample
    per prompt is enough; errors name the command-line flag."""

    def option_name(self, field_name: str) -> str:
        return f"--{field_name.replace('_', '-')}"


def generation_config(args: argparse.Namespace, temperature: float | None = None) -> GenerationConfig:
    """The `GenerationConfig` of parsed options (``temperature`` overrides ``--temperature``)."""
    return GenerationConfig(
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature if temperature is None else temperature, top_p=args.top_p, top_k=args.top_k,
        batch_size=args.batch_size, seed=args.seed,
    )


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat_template: str = "none",
    system_prompt: str | None = None,
) -> list[str]:
    """Prompts as the model sees them: raw text, or one user message (after an optional system message)
    rendered with a chat template and the generation prompt, as the training data modules render them."""
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ConfigError(f"--chat-template={chat_template!r}: use one of {', '.join(CHAT_TEMPLATE_CHOICES)}.")
    if chat_template == "none":
        return list(prompts)
    template = CHAT_TEMPLATES.get(chat_template)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat-template model: the tokenizer has no chat template. Fix: --chat-template zephyr.")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [
        tokenizer.apply_chat_template([*system, {"role": "user", "content": p}], chat_template=template,
                                      tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    desc: str = "sampling",
) -> list[list[Completion]]:
    """Sample ``config.num_samples`` completions per prompt (batched, seeded per batch).

    Prompts are tokenized as given (the tokenizer's own special tokens, e.g. BOS, are added; a chat-rendered
    prompt should not add a second BOS, see `render_prompts`) and left-padded.

    Returns:
        One list of ``num_samples`` completions per prompt, in prompt order.
    """
    out: list[list[Completion]] = []
    batches = range(0, len(prompts), config.batch_size)
    for index, start in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        out += _generate_batch(model, tokenizer, list(prompts[start : start + config.batch_size]), config,
                               config.seed + index, stop_strings)  # fmt: skip
    return out


def _generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: GenerationConfig,
    seed: int, stop_strings: Sequence[str],
) -> list[list[Completion]]:
    prompt_ids = [_encode_prompt(tokenizer, p) for p in prompts]
    greedy = config.temperature == 0
    per_prompt = 1 if greedy else config.num_samples
    sampling = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}
    new_tokens = seeded_generate(model, tokenizer, prompt_ids, seed, per_prompt, config.max_new_tokens, stop_strings,
                                 do_sample=not greedy, **sampling)  # (len(prompts) * per_prompt, <= max_new_tokens)
    eos_ids = stop_ids(model, tokenizer)
    completions = []
    for i, ids in enumerate(new_tokens):
        end = next((j + 1 for j, token in enumerate(ids) if token in eos_ids), len(ids))
        text = decode_until_special(tokenizer, ids)
        completions.append(Completion(text, prompt_ids[i // per_prompt], ids[:end]))
    grouped = [completions[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
    return [group * config.num_samples if greedy else group for group in grouped]


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt; a chat-rendered prompt that already starts with BOS gets no second one."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def sequence_logprobs(
    model: PreTrainedModel, completions: Sequence[Completion], batch_size: int = 8, progress: bool = False,
    desc: str = "log-probs",
) -> torch.Tensor:
    """Sum over each completion's tokens of ``log p(y_t | prompt, y_<t)`` under ``model``, in float32.

    Sequences are right-padded (so default position ids are correct); log-softmax is taken in float32.

    Returns:
        Shape ``(len(completions),)``, float32 on the CPU.
    """
    sums = []
    device = model.device
    for start in tqdm(range(0, len(completions), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = completions[start : start + batch_size]
        rows = [c.prompt_ids + c.ids for c in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        # target position t is predicted at t - 1; only sampled completion tokens count
        target_mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, c in enumerate(batch):
            target_mask[i, len(c.prompt_ids) : len(c.prompt_ids) + len(c.ids)] = True
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
            logps = torch.log_softmax(logits.float(), dim=-1)
            token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            sums.append((token_logps * target_mask[:, 1:]).sum(-1).cpu())
    return torch.cat(sums) if sums else torch.zeros(0)
