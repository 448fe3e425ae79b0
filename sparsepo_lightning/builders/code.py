"""Text-to-code preference pairs (MBPP, docs/method.md §6.5): sample solutions, run their tests, pair pass vs fail.

The problems and prompts are in :mod:`sparsepo_lightning.tasks.mbpp`; the pairs are read by
:class:`sparsepo_lightning.tasks.code.CodeDataModule`.

Follows Code-Optimise (Gee et al., arXiv 2406.12502): for every MBPP problem a causal LM writes ``k`` solutions,
each is run against the problem's tests in the sandbox (:mod:`sparsepo_lightning.sandbox`), and

- **training pairs** (``--mode all``): every passing solution is ``chosen`` against a random failing solution of
  the same problem as ``rejected``;
- **validation pairs** (``--mode one``): one random passing and one random failing solution per problem.

Randomness is one ``random.Random(seed)`` stream over the problems in file order. Identical solution texts are
counted once, solutions the sandbox could not run (``sandbox_error``) are ignored, and problems with no passing
or no failing solution give no pair and are counted (``PairReport.no_pass`` / ``no_fail``).

Files (JSON lines): samples ``{task_id, sample, origin, prompt, completion, passed, status}``; pairs
``{task_id, prompt, chosen, rejected}``, read by :class:`~sparsepo_lightning.tasks.code.CodeDataModule`. Building
is resumable like :mod:`sparsepo_lightning.builders.sentiment`: problems already in the samples file are skipped, and
batch ``i`` of the problem list is always sampled under seed ``seed + i``. Run::

    python -m sparsepo_lightning.builders.code build --model smollm2-135m --split train \\
        --samples data/cache/code/mbpp-train.samples.jsonl --out data/cache/code/mbpp-train.jsonl
    python -m sparsepo_lightning.builders.code build --model smollm2-135m --split validation --mode one \\
        --samples data/cache/code/mbpp-val.samples.jsonl --out data/cache/code/mbpp-val.jsonl
    python -m sparsepo_lightning.builders.code pair --samples data/cache/code/mbpp-train.samples.jsonl --out x.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsepo_lightning.builders.continuations import SamplingConfig, sample_continuations
from sparsepo_lightning.builders.jsonl import append_jsonl, read_jsonl
from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer
from sparsepo_lightning.sandbox import SANDBOX_ERROR, SandboxConfig, run_programs
from sparsepo_lightning.tasks.mbpp import MBPP_HUB_ID, STOP_STRINGS, CodeProblem, load_mbpp, truncate_completion

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("task_id", "prompt", "completion", "passed", "status")
PAIR_MODES = ("all", "one")


# Sampling + execution. ---------------------------------------------------------------------------------------


@dataclass
class SampleReport:
    """What one :func:`build_samples` call did."""

    problems: int
    already_done: int = 0
    """Problems found in the existing samples file and not sampled again."""
    written: int = 0
    """Samples appended by this call."""
    statuses: Counter[str] = field(default_factory=Counter)
    """Samples appended by this call, per sandbox status."""

    def summary(self) -> str:
        return (
            f"{self.problems} problems: {self.already_done} already done, {self.written} samples written "
            f"{dict(self.statuses)}"
        )


def build_samples(
    model: Any,
    tokenizer: Any,
    problems: Sequence[CodeProblem],
    out: str | Path,
    config: SamplingConfig | None = None,
    sandbox: SandboxConfig | None = None,
    workers: int | None = None,
    add_reference: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SampleReport:
    """Sample ``config.num_samples`` solutions per problem, run their tests, append sample rows to ``out``.

    Args:
        model: causal LM to sample from (left in its mode and device).
        tokenizer: its tokenizer.
        problems: distinct problems, in the order rows are written.
        out: samples JSONL; problems already in it are skipped (resume).
        config: sampling settings; defaults to ``SamplingConfig(max_new_tokens=512)``.
        sandbox: execution limits; defaults to ``SandboxConfig()``.
        workers: programs executed at once.
        add_reference: also execute and record the dataset's reference solution (``origin: reference``), so
            that every problem with a failing sample gives a pair. Off in Code-Optimise (self-generated only).
        overwrite: delete ``out`` first instead of resuming.
        progress: show progress bars.

    Raises:
        ValueError: duplicate task ids, or an existing ``out`` that does not belong to ``problems``.
    """
    config = config or SamplingConfig(max_new_tokens=512)
    out = Path(out)
    by_id = {p.task_id: p for p in problems}
    if len(by_id) != len(problems) or not problems:
        raise ValueError(f"build_samples: need distinct, non-empty problems (got {len(problems)}, {len(by_id)} ids).")
    if overwrite:
        out.unlink(missing_ok=True)
    done = _done_tasks(out, set(by_id))
    report = SampleReport(problems=len(problems), already_done=len(done))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(problems) - len(done), unit="problem", desc="sampling", disable=not progress)
    for index, start in enumerate(range(0, len(problems), config.batch_size)):
        batch = list(problems[start : start + config.batch_size])
        todo = [p for p in batch if p.task_id not in done]
        if not todo:
            continue  # the seed of each batch depends on its index only, so skipping keeps later batches intact
        texts = sample_continuations(model, tokenizer, [p.prompt for p in batch], config, config.seed + index,
                                     stop_strings=STOP_STRINGS)  # fmt: skip
        rows = []
        for problem, samples in zip(batch, texts, strict=True):
            if problem.task_id in done:
                continue
            rows += [_sample_row(problem, i, "model", truncate_completion(t)) for i, t in enumerate(samples)]
            if add_reference:
                rows.append(_sample_row(problem, len(samples), "reference", problem.code.replace("\r\n", "\n")))
        programs = [by_id[row["task_id"]].program(row["completion"]) for row in rows]
        for row, result in zip(rows, run_programs(programs, sandbox, workers, progress=False), strict=True):
            row["passed"], row["status"] = result.passed, result.status
            report.statuses[result.status] += 1
        append_jsonl(out, rows)
        report.written += len(rows)
        done.update(p.task_id for p in todo)
        bar.update(len(todo))
    bar.close()
    log.info("Built %s: %s", out, report.summary())
    return report


def _sample_row(problem: CodeProblem, index: int, origin: str, completion: str) -> dict[str, Any]:
    return {"task_id": problem.task_id, "sample": index, "origin": origin, "prompt": problem.prompt,
            "completion": completion}  # fmt: skip


def _done_tasks(out: Path, task_ids: set[int]) -> set[int]:
    """Task ids already in ``out``; refuse a file that was not built from these problems."""
    done: set[int] = set()
    if not out.exists():
        return done
    for line_no, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            problem = None if all(k in row for k in SAMPLE_KEYS) else f"lacks one of the keys {list(SAMPLE_KEYS)}"
        except json.JSONDecodeError:
            problem = "is not valid JSON (an interrupted write? delete that line)"
        if problem is None and row["task_id"] not in task_ids:
            problem = f"has task_id {row['task_id']!r}, which is not among the problems"
        if problem:
            raise ValueError(
                f"Refusing to append to {out}: line {line_no} {problem}. Pass --overwrite (overwrite=True) to "
                "rebuild it, or choose another --samples file."
            )
        done.add(row["task_id"])
    return done


# Pairing. ------------------------------------------------------------------------------------------------------


@dataclass
class PairReport:
    """What :func:`make_pairs` did."""

    problems: int = 0
    pairs: int = 0
    paired_problems: int = 0
    no_pass: int = 0
    """Problems without a passing solution (no pair)."""
    no_fail: int = 0
    """Problems without a failing solution (no pair)."""
    duplicates: int = 0
    """Samples dropped because the same solution text was already counted for the problem."""
    sandbox_errors: int = 0
    """Samples ignored because the sandbox could not run them."""

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.paired_problems} of {self.problems} problems; no pair for "
            f"{self.no_pass} problems without a passing and {self.no_fail} without a failing solution "
            f"(counted separately); {self.duplicates} duplicate and {self.sandbox_errors} unrunnable samples ignored"
        )


def make_pairs(samples: Iterable[dict[str, Any]], mode: str = "all", seed: int = 42) -> tuple[list[dict], PairReport]:
    """Pair passing (chosen) with failing (rejected) solutions of the same problem (Code-Optimise rule).

    Args:
        samples: rows with ``task_id``, ``prompt``, ``completion``, ``passed``, ``status``.
        mode: ``all`` = every distinct passing solution with a random failing one (training); ``one`` = one
            random passing and one random failing solution per problem (validation).
        seed: seeds one ``random.Random`` stream, consumed over problems in order of first appearance.

    Returns:
        ``(pairs, report)``; pairs are ``{task_id, prompt, chosen, rejected}`` in problem order.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"make_pairs: mode={mode!r} must be one of {PAIR_MODES} (all = training, one = validation).")
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in samples:
        groups.setdefault(row["task_id"], []).append(row)
    rng, pairs, report = random.Random(seed), [], PairReport(problems=len(groups))
    for task_id, rows in groups.items():
        passes, fails = _distinct_outcomes(rows, report)
        report.no_pass += not passes
        report.no_fail += not fails
        if not passes or not fails:
            continue
        chosen = passes if mode == "all" else [rng.choice(passes)]
        prompt = rows[0]["prompt"]
        pairs += [{"task_id": task_id, "prompt": prompt, "chosen": c, "rejected": rng.choice(fails)} for c in chosen]
        report.paired_problems += 1
    report.pairs = len(pairs)
    return pairs, report


def _distinct_outcomes(rows: list[dict[str, Any]], report: PairReport) -> tuple[list[str], list[str]]:
    """Distinct passing and failing completions in sample order; a text that ever passed is not a failure."""
    passes, fails = {}, {}
    for row in rows:
        if row["status"] == SANDBOX_ERROR:
            report.sandbox_errors += 1
            continue
        target = passes if row["passed"] else fails
        if row["completion"] in target:
            report.duplicates += 1
        target[row["completion"]] = None
    return list(passes), [c for c in fails if c not in passes]


# Command line. -------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsepo_lightning.builders.code",
        description="Build text-to-code preference pairs from MBPP (sample, execute, pair pass vs fail).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="Sample and execute solutions, then pair them.")
    build.add_argument("--model", required=True, help="Model alias (e.g. smollm2-135m), checkpoint folder or hub name.")
    build.add_argument("--source", default=MBPP_HUB_ID, help="Hub id, local folder in hub layout, or a file.")
    build.add_argument("--config", default="full", help="MBPP configuration: full or sanitized.")
    build.add_argument("--split", default="train", help="MBPP split: train, test, validation or prompt.")
    build.add_argument("--samples", required=True, type=Path, help="Samples JSONL; resumed if it exists.")
    build.add_argument("--limit", type=int, default=None, help="Use only the first N problems.")
    defaults = SamplingConfig()
    build.add_argument("--num-samples", type=int, default=10, help="Solutions sampled per problem (k).")
    build.add_argument("--max-new-tokens", type=int, default=512, help="Solution length limit, in tokens.")
    build.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature.")
    build.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling mass; 1 disables it.")
    build.add_argument("--batch-size", type=int, default=8, help="Problems per generate call.")
    build.add_argument("--seed", type=int, default=defaults.seed, help="Batch i is sampled with seed + i.")
    build.add_argument("--timeout", type=float, default=10.0, help="Wall-clock seconds per test program.")
    build.add_argument("--memory-mb", type=int, default=1024, help="Memory limit per test program.")
    build.add_argument("--workers", type=int, default=None, help="Test programs run at once.")
    build.add_argument("--add-reference", action="store_true", help="Also record the MBPP reference solution.")
    build.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    build.add_argument("--device", default="cpu", help="Torch device for sampling.")
    build.add_argument("--overwrite", action="store_true", help="Delete an existing --samples file first.")
    build.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    pair = sub.add_parser("pair", help="Pair an existing samples file.")
    pair.add_argument("--samples", required=True, type=Path, help="Samples JSONL written by `build`.")
    for parser in (build, pair):
        parser.add_argument("--out", required=True, type=Path, help="Pairs JSONL: task_id, prompt, chosen, rejected.")
        parser.add_argument("--mode", choices=PAIR_MODES, default="all", help="all = training rule, one = validation.")
        parser.add_argument("--pair-seed", type=int, default=42, help="Seed of the random pairing.")
    return p


def main(argv: Sequence[str] | None = None) -> PairReport:
    """Command-line entry point; see the module docstring."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        problems = load_mbpp(args.source, args.config, args.split)[: args.limit]
        config = SamplingConfig(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                seed=args.seed)  # fmt: skip
        sandbox = SandboxConfig(timeout=args.timeout, memory_mb=args.memory_mb)
        log.info("Sampling %d MBPP problems (%s/%s) with %s", len(problems), args.config, args.split, config)
        model = load_causal_lm(args.model, dtype=args.dtype).to(args.device).eval()
        build_samples(model, load_tokenizer(args.model), problems, args.samples, config, sandbox, args.workers,
                      args.add_reference, args.overwrite, not args.no_progress)  # fmt: skip
    pairs, report = make_pairs(read_jsonl(args.samples), args.mode, args.pair_seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    log.info("Wrote %s: %s", args.out, report.summary())
    return report


if __name__ == "__main__":
    main()
