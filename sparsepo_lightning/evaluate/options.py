"""Command-line options and inputs shared by the evaluation commands.

Building the parsers imports neither torch nor transformers (``sparsepo evaluate <command> --help`` is fast): what
loads or samples models is imported by the functions that use it, once a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsepo_lightning.chat_templates import CHAT_TEMPLATES
from sparsepo_lightning.errors import ConfigError

CHAT_TEMPLATE_CHOICES = ("none", "model", *CHAT_TEMPLATES)
"""``none``: raw prompt text; ``model``: the tokenizer's own template; or a built-in template by name."""


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """``--policies`` (required) and ``--labels``; read them back with `policy_labels`."""
    p.add_argument("--policies", nargs="+", required=True, help="Model names/paths or PreferenceModule checkpoints "
                   "(.ckpt files or sharded FSDP checkpoint folders).")  # fmt: skip
    p.add_argument("--labels", nargs="+", help="Display names of the policies (default: checkpoint file stems).")


def policy_labels(args: argparse.Namespace) -> list[str]:
    """One display name per ``--policies`` entry: ``--labels``, else the checkpoint file stems.

    Raises:
        ValueError: ``--labels`` has another count than ``--policies``.
    """
    from sparsepo_lightning.evaluate.policies import label_of

    labels = args.labels or [label_of(p) for p in args.policies]
    if len(labels) != len(args.policies):
        raise ConfigError(f"--labels: got {len(labels)} names for {len(args.policies)} --policies; give one each.")
    return labels


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """``--prompts`` (required) and ``--num-prompts``; read them back with `load_prompts`."""
    p.add_argument("--prompts", required=True, help="Prompts: .txt (one per line) or .jsonl/.json with 'prompt'.")
    p.add_argument("--num-prompts", type=int, default=None, help="Use only the first N distinct prompts.")
    p.add_argument("--prompt-field", default="prompt", help="The prompt's field in .jsonl/.json rows (default prompt).")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--device``, ``--out``, ``--no-progress``."""
    p.add_argument("--dtype", default="float32", help="Weight dtype: float32, bfloat16 or float16.")
    p.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda.")
    p.add_argument("--out", type=Path, required=True, help="Output folder (JSON, CSV, PNG, TensorBoard events).")
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def add_generation_arguments(
    p: argparse.ArgumentParser, num_samples: int, max_new_tokens: int, temperature: float | None = 1.0,
    top_p: float = 1.0, batch_size: int = 8,
) -> None:
    """Sampling options (defaults per command); ``temperature=None`` leaves ``--temperature`` to the command."""
    p.add_argument("--num-samples", type=int, default=num_samples, help="Completions sampled per prompt.")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="Completion length limit, in tokens.")
    if temperature is not None:
        p.add_argument("--temperature", type=float, default=temperature, help="Sampling temperature; 0 = greedy.")
    p.add_argument("--top-p", type=float, default=top_p, help="Nucleus sampling mass; 1 disables it.")
    p.add_argument("--top-k", type=int, default=0, help="Top-k sampling; 0 disables it.")
    p.add_argument("--batch-size", type=int, default=batch_size, help="Prompts per generate call.")
    p.add_argument("--seed", type=int, default=0, help="Batch i of the prompts is sampled with seed + i.")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATE_CHOICES, default="none",
                   help="Render each prompt as a chat user message: the tokenizer's template ('model') or a "
                   "built-in one; 'none' feeds raw text. Use what the policy was trained with.")  # fmt: skip
    p.add_argument("--system-prompt", default=None, help="With a chat template: a system message first ('' = empty).")


def load_prompts(path: str | Path, limit: int | None = None, field: str = "prompt") -> list[str]:
    """Distinct prompts, in file order: a text file (one per line) or JSON lines / a JSON list with ``field``.

    Works with the quickstart ``prompts.txt``, the IMDB SFT samples (``data/samples/imdb/imdb-sft-test.jsonl``)
    and any pairs file whose ``prompt`` (or ``field``) is a string.

    Raises:
        ValueError: no prompt found, or a row without a string ``field`` (named as ``file:line``; the element's
            index, from 1, in a .json list).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        if path.suffix == ".json":
            rows = list(enumerate(json.loads(text), 1))
            where = "element"
        else:
            rows = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            where = "line"
        prompts = []
        for number, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"{path}:{number}: {where} {number} has no string {field!r} (it has: {fields}). "
                                  "Fix: give a prompts file or pairs file, or name the field with --prompt-field.")
            prompts.append(row[field])
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = list(dict.fromkeys(prompts))[:limit]
    if not prompts:
        raise ConfigError(f"{path}: no prompts found.")
    return prompts


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON-friendly values, for the summary file."""
    plain = (str, int, float, bool, list, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in vars(args).items() if not callable(v)}
