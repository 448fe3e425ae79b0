"""Sentiment preference pairs: sample continuations of movie-review prefixes, score them, pair best vs worst.

For every prompt (a short review prefix such as "The acting in this film was") we sample `num_samples`
plain-text continuations from a causal LM (no chat template), score each continuation with a `Scorer`
(default: VADER compound sentiment in [-1, 1]; or `ClassifierScorer`, the positive-class probability of a
sentiment classifier such as ``lvwerra/distilbert-imdb``, via ``--scorer``) and keep the most positive as
`chosen` and the least positive as `rejected` (``--pairing best_worst``), or, as ODPO does, the better of the
first two samples against the other (``--pairing first_two``). Each output line is::

    {"prompt": str, "chosen": str, "rejected": str, "chosen_score": float, "rejected_score": float}

`prompt + chosen` is exactly the sampled text (continuations keep their leading space). Prompts that cannot
give a pair (fewer than two non-empty continuations, or best and worst scores tied) are counted and written
to a sidecar ``<out stem>.skipped.jsonl``, so a resumed run knows they are done.

Building is resumable: an existing output is read, its prompts are skipped and new rows are appended. Batch
``i`` of the prompt list is always sampled under seed ``seed + i``, so a resumed build writes the same rows as
an uninterrupted one. An output that was not built from this prompt list is never touched without
``--overwrite``.

Run (the quickstart data, see data/quickstart/README.md)::

    python -m sparsepo_lightning.builders.sentiment --model smollm2-135m \\
        --prompts data/quickstart/prompts.txt --out data/quickstart/train.jsonl --split train --val-size 64

IMDB review prefixes as prompts (docs/method.md §6.2; see `sparsepo_lightning.tasks.imdb_prompts.imdb_prompts`)::

    python -m sparsepo_lightning.builders.sentiment --model <imdb sft model> --imdb stanfordnlp/imdb \\
        --num-prompts 1000 --scorer lvwerra/distilbert-imdb --pairing first_two --out data/cache/imdb/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.builders.continuations import SamplingConfig, sample_continuations
from sparsepo_lightning.builders.jsonl import append_jsonl
from sparsepo_lightning.builders.scorers import Scorer, VaderScorer, make_scorer
from sparsepo_lightning.data.pairing import PAIR_KEYS, PAIRINGS, pair_samples
from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer
from sparsepo_lightning.tasks.imdb_prompts import imdb_prompts

log = logging.getLogger(__name__)

@dataclass
class BuildReport:
    """What one `build_pairs` call did."""

    prompts: int
    """Prompts in the requested list."""
    already_done: int = 0
    """Prompts found in the existing output (pairs or skipped) and not sampled again."""
    written: int = 0
    """Pairs appended by this call."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Prompts skipped by this call, by reason (`SKIP_EMPTY`, `SKIP_TIED`, `SKIP_IDENTICAL`)."""
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.prompts} prompts: {self.already_done} already done, {self.written} pairs written, "
            f"skipped {sum(self.skipped.values())} {dict(self.skipped)}; mean chosen score "
            f"{_mean(self.chosen_scores):.3f}, mean rejected score {_mean(self.rejected_scores):.3f}"
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def skipped_path(out: Path) -> Path:
    """Sidecar listing prompts that gave no pair: ``train.jsonl`` -> ``train.skipped.jsonl``."""
    return out.with_name(f"{out.stem}.skipped{out.suffix}")


def build_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    out: str | Path,
    scorer: Scorer | None = None,
    config: SamplingConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    pairing: str = "best_worst",
) -> BuildReport:
    """Sample, score and pair continuations for `prompts`, appending JSONL rows to `out` (resumable).

    Args:
        model: causal LM to sample from (left in whatever mode and device it is in).
        tokenizer: its tokenizer; without a pad token, EOS pads.
        prompts: distinct prompts, in the order rows are written.
        out: output JSONL file; prompts already in it (or in its ``.skipped`` sidecar) are not sampled again.
        scorer: scores continuations; defaults to `VaderScorer`.
        config: sampling settings; defaults to `SamplingConfig()`.
        overwrite: delete an existing output and its sidecar first instead of resuming.
        progress: show a tqdm progress bar.
        pairing: ``best_worst`` or ``first_two`` (ODPO), see `pair_samples`.

    Returns:
        A `BuildReport` with counts for this call.

    Raises:
        ValueError: duplicate prompts, an unknown `pairing`, or an existing output that was not built from
            `prompts` (unless `overwrite`).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is unknown: use one of {', '.join(PAIRINGS)}.")
    config = config or SamplingConfig()
    scorer = scorer or VaderScorer()
    out = Path(out)
    _check_distinct(prompts)
    if overwrite:
        out.unlink(missing_ok=True)
        skipped_path(out).unlink(missing_ok=True)
    done = _done_prompts(out, set(prompts))
    report = BuildReport(prompts=len(prompts), already_done=len(done))
    if done:
        log.info("Resuming %s: %d of %d prompts already done.", out, len(done), len(prompts))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts) - len(done), unit="prompt", desc="sampling", disable=not progress)
    for index, start in enumerate(range(0, len(prompts), config.batch_size)):
        batch = list(prompts[start : start + config.batch_size])
        if all(p in done for p in batch):
            continue  # the seed of each batch depends on its index only, so skipping keeps later batches intact
        samples = sample_continuations(model, tokenizer, batch, config, seed=config.seed + index)
        _score_and_write(batch, samples, done, scorer, out, report, pairing)
        bar.update(sum(p not in done for p in batch))
        done.update(batch)
    bar.close()
    log.info("Built %s: %s", out, report.summary())
    return report


def _score_and_write(
    batch: list[str],
    samples: list[list[str]],
    done: set[str],
    scorer: Scorer,
    out: Path,
    report: BuildReport,
    pairing: str = "best_worst",
) -> None:
    """Score one batch, pair each prompt not yet done, append rows and skips to their files."""
    flat = [text for texts in samples for text in texts]
    flat_scores = scorer(flat)
    if len(flat_scores) != len(flat):
        raise ValueError(
            f"The scorer returned {len(flat_scores)} scores for {len(flat)} texts; it must return one each."
        )
    n = len(samples[0])
    rows, skips = [], []
    for i, (prompt, texts) in enumerate(zip(batch, samples, strict=True)):
        if prompt in done:
            continue
        scores = flat_scores[i * n : (i + 1) * n]
        row, reason = pair_samples(prompt, texts, scores, pairing)
        if row is None:
            report.skipped[reason] += 1
            skips.append({"prompt": prompt, "reason": reason, "texts": texts, "scores": scores})
        else:
            rows.append(row)
            report.chosen_scores.append(row["chosen_score"])
            report.rejected_scores.append(row["rejected_score"])
    append_jsonl(out, rows)
    append_jsonl(skipped_path(out), skips)
    report.written += len(rows)


def _check_distinct(prompts: Sequence[str]) -> None:
    """Prompts identify rows when resuming, so they must be distinct."""
    duplicates = [p for p, count in Counter(prompts).items() if count > 1]
    if duplicates:
        raise ValueError(
            f"The prompt list has {len(duplicates)} duplicated prompts, e.g. {duplicates[0]!r}; remove them."
        )
    if not prompts:
        raise ValueError("The prompt list is empty.")


def _done_prompts(out: Path, prompts: set[str]) -> set[str]:
    """Prompts already in `out` or its sidecar; refuse files that do not belong to this prompt list."""
    done: set[str] = set()
    for path, required in ((out, PAIR_KEYS), (skipped_path(out), ("prompt", "reason"))):
        if not path.exists():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            problem = _row_problem(line, required, prompts, done)
            if problem:
                raise ValueError(
                    f"Refusing to append to {path}: line {lineno} {problem}, so it was not built from this prompt "
                    f"list. Pass --overwrite (overwrite=True) to rebuild it, or choose another --out."
                )
            done.add(json.loads(line)["prompt"])
    return done


def _row_problem(line: str, required: tuple[str, ...], prompts: set[str], done: set[str]) -> str | None:
    """Why an existing output line cannot be resumed from, or None if it is fine."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return "is not valid JSON (an interrupted write? delete that line)"
    if not isinstance(row, dict) or any(key not in row for key in required):
        return f"lacks one of the keys {list(required)}"
    if row["prompt"] not in prompts:
        return f"has prompt {row['prompt']!r}, which is not in the prompt list"
    if row["prompt"] in done:
        return f"repeats prompt {row['prompt']!r}"
    return None


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; surrounding whitespace is stripped and blank lines are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def split_prompts(prompts: Sequence[str], val_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically hold out `val_size` prompts chosen by a seeded shuffle.

    Returns:
        ``(train, val)``, each in the original order of `prompts`.
    """
    if not 0 <= val_size < len(prompts):
        raise ValueError(f"--val-size={val_size} must be in [0, {len(prompts)}) for {len(prompts)} prompts.")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:val_size])
    train = [p for i, p in enumerate(prompts) if i not in val_ids]
    val = [p for i, p in enumerate(prompts) if i in val_ids]
    return train, val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsepo_lightning.builders.sentiment",
        description="Build sentiment preference pairs (chosen = most positive continuation) as JSONL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Model alias (e.g. smollm2-135m), checkpoint folder or hub name.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, help="Text file with one prompt per line.")
    source.add_argument(
        "--imdb",
        metavar="DATASET",
        help="Review prefixes as prompts, from this IMDB hub id or local folder in the hub layout "
        "(e.g. stanfordnlp/imdb); see sparsepo_lightning.tasks.imdb_prompts.imdb_prompts.",
    )
    p.add_argument("--out", required=True, type=Path, help="Output JSONL; resumed if it exists.")
    p.add_argument("--imdb-split", default="train", help="--imdb: dataset split (train, test or unsupervised).")
    p.add_argument("--imdb-config", default="plain_text", help="--imdb: dataset configuration.")
    p.add_argument("--num-prompts", type=int, help="--imdb: distinct prompts sampled (seeded); default all.")
    p.add_argument("--min-words", type=int, default=2, help="--imdb: shortest prompt, in words.")
    p.add_argument("--max-words", type=int, default=8, help="--imdb: longest prompt, in words (= min: fixed).")
    p.add_argument("--prompt-seed", type=int, default=0, help="--imdb: seed of prompt lengths and sampling.")
    p.add_argument("--split", choices=("all", "train", "val"), default="all", help="Which part of the prompts to use.")
    p.add_argument("--val-size", type=int, default=0, help="Prompts held out for the 'val' split.")
    p.add_argument("--split-seed", type=int, default=0, help="Seed of the train/val shuffle.")
    defaults = SamplingConfig()
    p.add_argument("--num-samples", type=int, default=defaults.num_samples, help="Continuations per prompt.")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="Continuation length limit.")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="Sampling temperature.")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="Top-k sampling; 0 disables it.")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="Nucleus sampling mass; 1 disables it.")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Prompts per generate call.")
    p.add_argument("--seed", type=int, default=defaults.seed, help="Batch i is sampled with seed + i.")
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    p.add_argument("--device", default="cpu", help="Torch device for sampling, e.g. cpu or cuda.")
    p.add_argument("--scorer", default="vader", help="'vader', or a sentiment classifier name/path (P(positive)).")
    p.add_argument("--scorer-positive-label", help="Classifier label name or index of the positive class.")
    p.add_argument("--pairing", choices=PAIRINGS, default="best_worst", help="best_worst, or ODPO's first_two.")
    p.add_argument("--overwrite", action="store_true", help="Delete an existing --out (and sidecar) first.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return p


def main(argv: Sequence[str] | None = None) -> BuildReport:
    """Command-line entry point; see the module docstring."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = read_prompts(args.prompts) if args.prompts else _imdb_prompts(args)
    if args.split != "all":
        if args.val_size <= 0:
            raise SystemExit(f"--split {args.split} needs --val-size > 0 (prompts held out for validation).")
        train, val = split_prompts(prompts, args.val_size, args.split_seed)
        prompts = train if args.split == "train" else val
    config = SamplingConfig(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    log.info("Sampling %d prompts (%s split) with %s", len(prompts), args.split, config)
    model = load_causal_lm(args.model, dtype=args.dtype).to(args.device).eval()
    tokenizer = load_tokenizer(args.model)
    label = args.scorer_positive_label
    label = int(label) if label is not None and label.isdigit() else label
    scorer = make_scorer(args.scorer, positive_label=label, batch_size=args.batch_size, device=args.device)
    return build_pairs(
        model, tokenizer, prompts, args.out, scorer=scorer, config=config, overwrite=args.overwrite,
        progress=not args.no_progress, pairing=args.pairing,
    )


def _imdb_prompts(args: argparse.Namespace) -> list[str]:
    return imdb_prompts(
        args.imdb, args.imdb_split, args.num_prompts, args.min_words, args.max_words, args.prompt_seed, args.imdb_config
    )


if __name__ == "__main__":
    main()
