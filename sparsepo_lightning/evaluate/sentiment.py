"""``sparsepo evaluate sentiment``: expected sentiment reward and sampled KL(π_θ‖π_ref) per policy (docs/method.md
§6.2).

For each policy (model name/path or checkpoint), ``--num-samples`` continuations of each held-out prompt are
sampled and scored by the same pluggable scorer as the IMDB pair builder (``vader`` or a classifier name, whose
score is P(positive)). The sequence KL is estimated on the policy's own samples::

    KL(π_θ‖π_ref) ≈ mean over samples y ~ π_θ of Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]

(log-softmax in float32, summed over the sampled tokens including a sampled EOS). The estimator is unbiased only
when the samples come from π_θ itself: keep ``--temperature 1 --top-p 1 --top-k 0`` (the defaults) for it.
Each policy is one point of the reward–KL frontier plot, labelled by run and step (``quickstart/version_0 @ step
70``); each reference is drawn too, as the KL = 0 anchor at its own expected reward (its samples scored the same
way; ``references`` in the JSON). Run::

    sparsepo evaluate sentiment --policies runs/a/checkpoints/last.ckpt runs/b/checkpoints/last.ckpt \\
        --prompts data/samples/imdb/imdb-sft-test.jsonl --num-samples 8 --out eval/imdb
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

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
    import torch

    from sparsepo_lightning.evaluate.sampling import Completion

log = logging.getLogger(__name__)
HELP = "Expected sentiment reward and sampled KL(policy||reference) per checkpoint; reward-KL frontier plot."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_policy_arguments(p)
    p.add_argument("--reference", help="Reference model for the KL (default: the one each checkpoint was trained "
                   "against; required for plain model names).")  # fmt: skip
    add_prompt_arguments(p)
    p.add_argument("--scorer", default="vader", help="'vader', or a sentiment classifier name/path (P(positive)).")
    p.add_argument("--scorer-positive-label", help="Classifier label name or index of the positive class.")
    add_generation_arguments(p, num_samples=4, max_new_tokens=48)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every policy; returns the JSON summary."""
    from sparsepo_lightning.builders.scorers import make_scorer
    from sparsepo_lightning.evaluate.policies import load_policy
    from sparsepo_lightning.evaluate.sampling import generation_config
    from sparsepo_lightning.model_sources import load_causal_lm

    labels = policy_labels(args)
    prompts = load_prompts(args.prompts, args.num_prompts, args.prompt_field)
    generation_config(args)  # checks the sampling options before any model loads
    label = args.scorer_positive_label
    scorer = make_scorer(args.scorer, int(label) if label and label.isdigit() else label, device=args.device)
    report = Report(args.out, "sentiment")
    results, samples, references, anchors = [], [], {}, {}
    for step, (spec, name) in enumerate(zip(args.policies, labels, strict=True)):
        ref_name = _reference_for(spec, args.reference)
        if ref_name not in references:
            references = {ref_name: load_causal_lm(ref_name, dtype=args.dtype).to(args.device).eval()}
        policy = load_policy(spec, args.dtype, args.device, label=name)
        result, rows = _score(args, policy.model, policy.tokenizer, references[ref_name], prompts, scorer, name)
        result = {"label": name, "policy": spec, "reference": ref_name, **result}
        results.append(result)
        report.scalars({"reward": result["reward_mean"], "kl": result["kl_mean"]}, step)
        report.text(f"samples/{name}", "\n\n".join(f"**{r['prompt']}**{r['completion']}" for r in rows[:8]))
        samples += rows
        kl = result["kl_mean"]
        log.info("%s: reward %.4f, KL %.4f%s", name, result["reward_mean"], kl, kl_note(kl))
        if spec == ref_name:  # the reference itself was evaluated: its point is the anchor
            anchors[ref_name] = {**result, "label": f"reference {ref_name}"}
        elif ref_name not in anchors:  # the reference's own samples, scored the same way; KL 0 by definition
            anchor, _ = _score(args, references[ref_name], policy.tokenizer, None, prompts, scorer, ref_name)
            anchors[ref_name] = {"label": f"reference {ref_name}", "policy": ref_name, "reference": ref_name,
                                 **anchor}  # fmt: skip
            log.info("reference %s: reward %.4f", ref_name, anchor["reward_mean"])
        del policy
    summary = {"command": "sentiment", "config": options_record(args), "results": results,
               "references": list(anchors.values())}
    report.write_json(summary)
    report.write_csv(results)
    report.write_jsonl(samples)
    report.plot(frontier_plot(results, list(anchors.values())))
    summary["files"] = {k: str(v) for k, v in report.close().items()}
    return summary


def _score(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, reference: torch.nn.Module | None,
           prompts: list[str], scorer: Any, name: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample ``model``, score the samples and estimate the KL to ``reference`` (0 when ``None``: the reference
    itself); returns the summary and one row per sample."""
    import torch

    from sparsepo_lightning.evaluate.sampling import generate, generation_config, render_prompts

    config = generation_config(args)
    rendered = render_prompts(tokenizer, prompts, args.chat_template, args.system_prompt)
    completions = generate(model, tokenizer, rendered, config, progress=not args.no_progress, desc=f"sampling {name}")
    flat = [c for group in completions for c in group]
    rewards = torch.tensor(scorer([c.text for c in flat]), dtype=torch.float64)
    kl = (sequence_kl(model, reference, flat, args.batch_size, not args.no_progress) if reference is not None
          else torch.zeros(len(flat)))  # fmt: skip
    rows = [{"label": name, "prompt": prompts[i // config.num_samples], "completion": c.text,
             "reward": float(rewards[i]), "kl": float(kl[i])} for i, c in enumerate(flat)]  # fmt: skip
    return summarise(rewards, kl), rows


def _reference_for(spec: str, reference: str | None) -> str:
    from sparsepo_lightning.evaluate.policies import reference_name

    name = reference or reference_name(spec)
    if name is None:
        raise ConfigError(f"--policies {spec}: a plain model name has no known reference. Fix: pass --reference "
                         "(e.g. the SFT model the policy started from).")  # fmt: skip
    return name


def sequence_kl(
    policy: torch.nn.Module, reference: torch.nn.Module, completions: list[Completion], batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Per-sample ``Σ_t log π_θ(y_t|…) − log π_ref(y_t|…)`` over sampled tokens, float32, shape ``(N,)``."""
    from sparsepo_lightning.evaluate.sampling import sequence_logprobs

    policy_logps = sequence_logprobs(policy, completions, batch_size, progress, desc="policy log-probs")
    reference_logps = sequence_logprobs(reference, completions, batch_size, progress, desc="reference log-probs")
    return policy_logps - reference_logps


def summarise(rewards: torch.Tensor, kl: torch.Tensor) -> dict[str, float]:
    """Means, standard deviations and standard errors of the per-sample rewards and KL estimates."""
    n = rewards.numel()
    out: dict[str, float] = {"num_samples": n}
    for name, values in (("reward", rewards.double()), ("kl", kl.double())):
        std = float(values.std()) if n > 1 else 0.0
        out |= {f"{name}_mean": float(values.mean()), f"{name}_std": std, f"{name}_sem": std / n**0.5}
    return out


def frontier_plot(results: list[dict[str, Any]], references: list[dict[str, Any]] = ()) -> Plot:
    """One point per policy: x = KL, y = expected reward, labelled with the policy name; each reference as its
    KL = 0 anchor."""
    series = [Series(label, [r["kl_mean"] for r in rows], [r["reward_mean"] for r in rows],
                     point_labels=[r["label"] for r in rows])  # fmt: skip
              for label, rows in (("reference (KL = 0)", references), ("policies", results)) if rows]
    return Plot("Reward-KL frontier", "sequence KL(policy || reference), nats", "expected reward", series,
                lines=False)  # fmt: skip


def kl_note(kl: float) -> str:
    """A word on a negative sampled KL: the true KL is >= 0, the sample estimate is not."""
    if kl >= 0:
        return ""
    return (" (negative: a sampled estimate of a KL that is >= 0; the policy is within sampling noise of the reference."
            " More samples (--num-samples, --num-prompts) narrow it)")
