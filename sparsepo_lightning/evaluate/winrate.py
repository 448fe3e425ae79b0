"""``sparsepo evaluate winrate``: how often a policy's completion beats an opponent's, according to a judge.

Each policy and the opponent (``--opponent``, default: the reference the checkpoint was trained against) sample
``--num-samples`` completions per prompt with the same seeds; sample ``j`` of the policy meets sample ``j`` of the
opponent. The judge scores every completion; a **win** is a strictly higher score, a tie counts one half::

    win rate = (wins + ties / 2) / comparisons

The 95% interval is a percentile bootstrap over prompts (``--bootstrap`` resamples, seeded), since the samples of
one prompt are not independent. Judges (``--judge``):

- ``vader``: VADER compound sentiment of the completion, in [-1, 1];
- a sentiment classifier name/path with ``--judge-type classifier`` (default): P(positive) of the completion
  (``AutoModelForSequenceClassification``, as in the IMDB pair builder);
- a reward model with ``--judge-type reward``: ``AutoModelForSequenceClassification`` with a single output whose
  logit is the reward of ``prompt + completion`` (plain concatenation; ``--judge-chat-template`` renders the pair
  as a user and an assistant message with the judge tokenizer's chat template instead).

Run::

    sparsepo evaluate winrate --policies runs/a/checkpoints/last.ckpt --prompts data/samples/imdb/imdb-sft-test.jsonl \\
        --judge vader --out eval/winrate
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.evaluate.options import (
    add_generation_arguments,
    add_model_arguments,
    add_policy_arguments,
    add_prompt_arguments,
    load_prompts,
    options_record,
    policy_labels,
)
from sparsepo_lightning.evaluate.reporting import Plot, Report, Series

if TYPE_CHECKING:
    from sparsepo_lightning.builders.scorers import Scorer

log = logging.getLogger(__name__)
HELP = "Win rate of policies vs the reference or another checkpoint, judged by a scorer or reward model."
JUDGE_TYPES = ("classifier", "reward")


class RewardModelJudge:
    """Scalar reward of ``prompt + completion`` from a one-output ``AutoModelForSequenceClassification``.

    Args:
        model_name: hub name or local folder of the reward model.
        chat_template: render (prompt, completion) as user/assistant messages with the judge's chat template.
        batch_size: texts per forward pass.
        device: torch device.
        max_length: inputs are truncated (from the left, keeping the completion) to this many tokens.
    """

    def __init__(self, model_name: str, chat_template: bool = False, batch_size: int = 16, device: str = "cpu",
                 max_length: int = 1024) -> None:  # fmt: skip
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name, truncation_side="left")
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ConfigError(f"--judge {model_name}: a reward model has one output, this one has "
                             f"{self.model.config.num_labels}. Fix: --judge-type classifier.")  # fmt: skip
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat_template, self.batch_size, self.max_length = chat_template, batch_size, max_length

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        texts = [self._render(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.model.device)  # fmt: skip
            with torch.inference_mode():
                scores += self.model(**batch).logits.float()[:, 0].tolist()  # (batch,)
        return scores

    def _render(self, prompt: str, completion: str) -> str:
        if not self.chat_template:
            return prompt + completion
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)


def make_judge(name: str, judge_type: str = "classifier", chat_template: bool = False, device: str = "cpu"):
    """A callable ``(prompts, completions) -> scores``: vader, a sentiment classifier, or a reward model."""
    from sparsepo_lightning.builders.scorers import make_scorer

    if judge_type not in JUDGE_TYPES:
        raise ConfigError(f"--judge-type={judge_type!r}: use one of {', '.join(JUDGE_TYPES)}.")
    if judge_type == "reward" and name.lower() != "vader":
        return RewardModelJudge(name, chat_template=chat_template, device=device)
    scorer: Scorer = make_scorer(name, device=device)
    return lambda prompts, completions: scorer(list(completions))


def outcomes(policy_scores: Sequence[float], opponent_scores: Sequence[float]) -> np.ndarray:
    """1 for a win (strictly higher), 0.5 for a tie, 0 for a loss; shape ``(N,)``."""
    a, b = np.asarray(policy_scores, dtype=float), np.asarray(opponent_scores, dtype=float)
    return (a > b) + 0.5 * (a == b)


def bootstrap_interval(per_prompt: np.ndarray, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean outcome, resampling prompts.

    Args:
        per_prompt: outcomes, shape ``(prompts, samples)``.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, per_prompt.shape[0], size=(resamples, per_prompt.shape[0]))  # (resamples, prompts)
    means = per_prompt[picks].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_policy_arguments(p)
    p.add_argument("--opponent", help="Model name/path or checkpoint to compare with (default: each checkpoint's "
                   "reference; required for plain model names).")  # fmt: skip
    add_prompt_arguments(p)
    p.add_argument("--judge", default="vader", help="'vader', a sentiment classifier, or a reward model name/path.")
    p.add_argument("--judge-type", choices=JUDGE_TYPES, default="classifier",
                   help="How a model judge scores: classifier = P(positive), reward = scalar logit.")
    p.add_argument("--judge-chat-template", action="store_true", help="Reward model: render with its chat template.")
    p.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% interval.")
    add_generation_arguments(p, num_samples=4, max_new_tokens=48)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compare every policy with its opponent; returns the JSON summary."""
    from sparsepo_lightning.evaluate.policies import reference_name

    labels = policy_labels(args)
    prompts = load_prompts(args.prompts, args.num_prompts, args.prompt_field)
    judge = make_judge(args.judge, args.judge_type, args.judge_chat_template, args.device)
    report = Report(args.out, "winrate")
    results, rows, cache = [], [], {}
    for step, (spec, label) in enumerate(zip(args.policies, labels, strict=True)):
        opponent = args.opponent or reference_name(spec)
        if opponent is None:
            raise ConfigError(f"--policies {spec}: a plain model name has no known reference. Fix: pass --opponent.")
        if opponent not in cache:  # keep one opponent's scored samples: policies usually share it
            cache = {opponent: _scored_samples(opponent, prompts, judge, args)}
        policy_texts, policy_scores = _scored_samples(spec, prompts, judge, args, label)
        opponent_texts, opponent_scores = cache[opponent]
        outcome = outcomes(policy_scores, opponent_scores)
        low, high = bootstrap_interval(outcome.reshape(len(prompts), args.num_samples), args.bootstrap, args.seed)
        result = {"label": label, "policy": spec, "opponent": opponent, "comparisons": len(outcome),
                  "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
                  "losses": int((outcome == 0).sum()), "win_rate": float(outcome.mean()), "ci_low": low,
                  "ci_high": high}  # fmt: skip
        results.append(result)
        report.scalars({"win_rate": result["win_rate"], "ci_low": low, "ci_high": high}, step)
        n = args.num_samples
        rows += [{"label": label, "prompt": prompts[i // n], "policy_completion": policy_texts[i],
                  "opponent_completion": opponent_texts[i], "policy_score": policy_scores[i],
                  "opponent_score": opponent_scores[i], "outcome": float(outcome[i])}
                 for i in range(len(outcome))]  # fmt: skip
        log.info("%s vs %s: win rate %.3f [%.3f, %.3f]", label, opponent, result["win_rate"], low, high)
    summary = {"command": "winrate", "config": options_record(args), "results": results}
    report.write_json(summary)
    report.write_csv(results)
    report.write_jsonl(rows)
    series = Series("win rate (95% CI)", list(range(len(results))), [r["win_rate"] for r in results],
                    low=[r["ci_low"] for r in results], high=[r["ci_high"] for r in results],
                    point_labels=[r["label"] for r in results])  # fmt: skip
    report.plot(Plot(f"Win rate judged by {args.judge}", "policy", "win rate", [series], lines=False, hline=0.5))
    summary["files"] = {k: str(v) for k, v in report.close().items()}
    return summary


def _scored_samples(spec: str, prompts: list[str], judge: Any, args: argparse.Namespace,
                    label: str | None = None) -> tuple[list[str], list[float]]:  # fmt: skip
    """Flat completions (prompt-major) of one model and their judge scores."""
    from sparsepo_lightning.evaluate.policies import load_policy
    from sparsepo_lightning.evaluate.sampling import generate, generation_config, render_prompts

    policy = load_policy(spec, args.dtype, args.device, label=label)
    rendered = render_prompts(policy.tokenizer, prompts, args.chat_template, args.system_prompt)
    groups = generate(policy.model, policy.tokenizer, rendered, generation_config(args),
                      progress=not args.no_progress, desc=f"sampling {policy.label}")  # fmt: skip
    texts = [c.text for group in groups for c in group]
    scores = [float(s) for s in judge([p for p in prompts for _ in range(args.num_samples)], texts)]
    return texts, scores
