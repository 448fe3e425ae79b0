"""``sparsepo evaluate summarization``: ROUGE against reference summaries and self-BLEU over a temperature sweep.

Follows the TL;DR evaluation of the reference README (docs/method.md §6.4): for each of ``--num-prompts`` posts,
``--num-samples`` summaries are sampled (nucleus ``--top-p 0.5``) at each temperature of ``--temperatures``
(0 = greedy: one decode repeated, so its self-BLEU is 1). Metrics per temperature:

- ROUGE-1/2/L F-measure (torchmetrics ``ROUGEScore``, default tokenisation, no stemming) of every sample against
  the post's reference summaries (all distinct preferred summaries of that post; the best-matching one counts);
  ``rougeLsum`` needs ``nltk`` and its ``punkt_tab`` data on disk (never downloaded here) and is skipped otherwise;
- self-BLEU (diversity, lower = more diverse): for each post, corpus sacreBLEU (torchmetrics, 13a tokenisation)
  of its samples, each against the other samples of the same post as references, averaged over posts, in [0, 1].

Data: TL;DR ``comparisons`` rows (a hub-layout folder such as ``data/samples/tldr`` with ``--subset`` and
``--split``, or a file of such rows) or any pairs file with ``prompt``/``chosen``. Run::

    sparsepo evaluate summarization --policies runs/tldr/checkpoints/last.ckpt --data data/samples/tldr \\
        --split validation --num-prompts 100 --num-samples 5 --out eval/tldr
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Any

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.evaluate.options import (
    add_generation_arguments,
    add_model_arguments,
    add_policy_arguments,
    options_record,
    policy_labels,
)
from sparsepo_lightning.evaluate.reporting import Plot, Report, Series

log = logging.getLogger(__name__)
HELP = "ROUGE vs reference summaries and self-BLEU diversity over a temperature sweep."
DEFAULT_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_policy_arguments(p)
    p.add_argument("--data", required=True, help="TL;DR hub-layout folder or file of comparisons, or a pairs file.")
    p.add_argument("--subset", default="comparisons", help="Folder data: TL;DR subset (comparisons).")
    p.add_argument("--split", default="validation", help="Folder data: split.")
    p.add_argument("--num-prompts", type=int, default=100, help="Use only the first N distinct posts.")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="Temperature sweep; 0 = greedy.")  # fmt: skip
    p.add_argument("--rouge-keys", nargs="+", default=list(DEFAULT_ROUGE_KEYS),
                   help="ROUGE variants (rouge1..rouge9, rougeL, rougeLsum; rougeLsum needs nltk + punkt_tab).")
    add_generation_arguments(p, num_samples=5, max_new_tokens=64, temperature=None, top_p=0.5)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sweep temperatures for each policy; returns the JSON summary."""
    from sparsepo_lightning.evaluate.policies import load_policy
    from sparsepo_lightning.evaluate.sampling import generate, generation_config, render_prompts

    labels = policy_labels(args)
    references = load_references(args.data, args.subset, args.split, args.num_prompts)
    prompts = list(references)
    keys = usable_rouge_keys(args.rouge_keys)
    report = Report(args.out, "summarization")
    results, samples = [], []
    for spec, label in zip(args.policies, labels, strict=True):
        policy = load_policy(spec, args.dtype, args.device, label=label)
        rendered = render_prompts(policy.tokenizer, prompts, args.chat_template, args.system_prompt)
        for temperature in args.temperatures:
            groups = generate(policy.model, policy.tokenizer, rendered, generation_config(args, temperature),
                              progress=not args.no_progress, desc=f"{label} T={temperature}")  # fmt: skip
            texts = [[c.text for c in group] for group in groups]
            metrics = {**rouge(texts, [references[p] for p in prompts], keys), "self_bleu": self_bleu(texts)}
            results.append({"label": label, "policy": spec, "temperature": temperature, **metrics})
            report.scalars({f"{label}/{k}": v for k, v in metrics.items()}, step=round(temperature * 100))
            samples += [{"label": label, "temperature": temperature, "prompt": p, "sample": j, "summary": t}
                        for p, group in zip(prompts, texts, strict=True) for j, t in enumerate(group)]  # fmt: skip
            log.info("%s T=%s: %s", label, temperature, metrics)
    summary = {"command": "summarization", "config": options_record(args), "rouge_keys": list(keys),
               "results": results}  # fmt: skip
    report.write_json(summary)
    report.write_csv(results)
    report.write_jsonl(samples)
    report.plot(sweep_plot(results, [f"{k}_fmeasure" for k in keys] + ["self_bleu"]))
    summary["files"] = {k: str(v) for k, v in report.close().items()}
    return summary


def load_references(data: str, subset: str, split: str, limit: int | None) -> dict[str, list[str]]:
    """Prompt -> distinct reference summaries (the preferred summary of each comparison), first ``limit`` prompts.

    Rows may be TL;DR ``comparisons`` rows (``info`` + ``summaries`` + ``choice``) or pairs with ``prompt`` and
    ``chosen``; a folder is read as a hub dataset (``subset``, ``split``), a file by its suffix.
    """
    from sparsepo_lightning.data.readers import iter_file, load_hub_split
    from sparsepo_lightning.tasks.tldr import TLDR_HUB_ID, TLDR_PARQUET_REVISION, comparison_to_pair

    if Path(data).is_file():
        rows = (row.value for row in iter_file(data))
    else:  # TL;DR keeps each subset in a folder (data_dir), as TLDRDataModule reads it
        revision = {"revision": TLDR_PARQUET_REVISION} if data == TLDR_HUB_ID else {}
        rows = load_hub_split(data, None, split, data_dir=subset, **revision)
    references: dict[str, list[str]] = {}
    for row in rows:
        pair = comparison_to_pair(row) if "summaries" in row else row
        if not isinstance(pair.get("prompt"), str) or not isinstance(pair.get("chosen"), str):
            raise ConfigError(f"{data}: a row has no string prompt/chosen (keys {sorted(pair)}); give TL;DR "
                             "comparisons or plain-text pairs.")  # fmt: skip
        if pair["prompt"] not in references and limit is not None and len(references) >= limit:
            continue
        chosen = references.setdefault(pair["prompt"], [])
        if pair["chosen"] not in chosen:
            chosen.append(pair["chosen"])
    if not references:
        raise ConfigError(f"{data}: no rows found (subset {subset!r}, split {split!r}).")
    return references


def usable_rouge_keys(keys: list[str]) -> tuple[str, ...]:
    """``keys`` without ``rougeLsum`` when nltk or its ``punkt_tab`` data is missing (never downloaded here)."""
    if "rougeLsum" not in keys or _punkt_available():
        return tuple(keys)
    log.warning("Skipping rougeLsum: it needs nltk with the punkt_tab data on disk (nltk.download('punkt_tab')).")
    return tuple(k for k in keys if k != "rougeLsum")


def _punkt_available() -> bool:
    if importlib.util.find_spec("nltk") is None:
        return False
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def rouge(samples: list[list[str]], references: list[list[str]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean ROUGE F-measure of every sample against its prompt's references (best reference counts).

    Args:
        samples: per prompt, its sampled summaries.
        references: per prompt, one or more reference summaries.
    """
    from torchmetrics.text import ROUGEScore

    metric = ROUGEScore(rouge_keys=keys, accumulate="best")
    for group, refs in zip(samples, references, strict=True):
        metric.update(group, [refs] * len(group))
    scores = metric.compute()
    return {f"{k}_fmeasure": float(scores[f"{k}_fmeasure"]) for k in keys}


def self_bleu(samples: list[list[str]]) -> float:
    """Mean over prompts of corpus sacreBLEU of each sample against the prompt's other samples, in [0, 1].

    Prompts with fewer than two samples are skipped (NaN when none has two).
    """
    from torchmetrics.functional.text import sacre_bleu_score

    scores = []
    for group in samples:
        if len(group) < 2:
            continue
        others = [group[:i] + group[i + 1 :] for i in range(len(group))]
        scores.append(float(sacre_bleu_score(group, others, tokenize="13a")))
    return sum(scores) / len(scores) if scores else float("nan")


def sweep_plot(results: list[dict[str, Any]], metrics: list[str]) -> Plot:
    """Metric vs temperature, one line per (policy, metric)."""
    series = []
    for label in dict.fromkeys(r["label"] for r in results):
        rows = [r for r in results if r["label"] == label]
        series += [Series(f"{label} {m}", [r["temperature"] for r in rows], [r[m] for r in rows]) for m in metrics]
    return Plot("Summarization metrics vs temperature", "temperature", "score", series)
