"""The sizes and settings of a study (``StudySettings``) and the placeholders a plan's arms may use (``substitute``).

Kept apart from ``plan`` (the runs of a plan) so that the plan-file reader (``planfile``) and ``plan`` both read them
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StudySettings:
    """Sizes of the study. The defaults take about five hours of two CPU cores (the report states the measured cost).

    Attributes:
        model: initial policy and reference (an alias, a local checkpoint or a hub name).
        train_prompts: review openings sampled for training pairs (prompts that give no pair are skipped).
        heldout_prompts: review openings held out: evaluation prompts and validation/heat-map pairs.
        min_words, max_words: length of a review opening, in words.
        samples_per_prompt: continuations sampled and scored per prompt by the pair builder.
        max_new_tokens: continuation length, for the pairs and for evaluation samples.
        steps, batch_size: optimizer steps of every run and pairs per step (the first ``steps × batch_size`` pairs of
            the seeded shuffle of the training pairs).
        lr, mask_lr: policy and mask-network learning rates (constant after a 10 % warm-up, then cosine).
        betas: β of every method (one frontier point per β).
        seeds: seeds of the methods in ``Method.all_seeds``; the others run with the first seed only. A seed sets
            the data order and the mask initialisation/draws.
        eval_samples: completions per held-out prompt at evaluation (temperature 1).
        max_length, max_prompt_length: token limits of the training rows.
    """

    model: str = "smollm2-135m"
    train_prompts: int = 2100
    heldout_prompts: int = 200
    min_words: int = 4
    max_words: int = 8
    samples_per_prompt: int = 6
    max_new_tokens: int = 12
    steps: int = 64
    batch_size: int = 8
    lr: float = 2e-5
    mask_lr: float = 1e-3
    betas: tuple[float, ...] = (0.1, 0.3, 0.8)
    seeds: tuple[int, ...] = (0, 1)
    eval_samples: int = 4
    max_length: int = 40
    max_prompt_length: int = 24

    def data_key(self) -> dict[str, Any]:
        """The settings the built data depends on."""
        names = ("model", "train_prompts", "heldout_prompts", "min_words", "max_words", "samples_per_prompt",
                 "max_new_tokens")
        return {n: getattr(self, n) for n in names}



def substitute(value: Any, seed: int, beta: float, matched: dict[str, float] | None) -> Any:
    """``value`` with ``$seed``, ``$beta`` and ``$matched.<key>`` strings replaced by the run's values."""
    if isinstance(value, dict):
        return {k: substitute(v, seed, beta, matched) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, seed, beta, matched) for v in value]
    if value == "$seed":
        return seed
    if value == "$beta":
        return beta
    if isinstance(value, str) and value.startswith("$matched."):
        if matched is None:
            raise ValueError(f"{value} needs the measured sparsity of a matched run (`matches:` in the plan)")
        return matched[value.removeprefix("$matched.")]
    return value
