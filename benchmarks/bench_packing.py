"""Padded vs packed pair layouts vs TRL's ``DPOTrainer``: positions per pair, step time and step memory, on two
length mixes, the same pairs and the same micro-batches for every configuration.

Mixes (lengths in tokens of the SmolLM2 tokenizer):

- ``hh``: an Anthropic-HH-like mix, long shared prompts and varied responses. Prompt and response lengths are
  drawn (seeded) from log-normal distributions whose medians come from the HH-RLHF row of the prefix-sharing
  paper's table (Wang & Hegde 2024, arXiv 2410.20305; github.com/frankxwang/dpo-prefix-sharing README at commit
  8963fa984a894ea19dad0309ed424d0921606b50: median overall length 186, median prefix-to-completion ratio 2.15,
  so a median prompt of 186 · 2.15 / 3.15 ≈ 127 and a median response of ≈ 59 tokens). The spreads (σ of the
  log-length: 0.6 for prompts, 0.7 for responses) are this benchmark's assumption, not measured; prompts are
  clipped to [16, 320] and responses to [4, 192] tokens. Token ids are cut from the quickstart text.
- ``side_by_side`` (on request, ``--mixes``): ``bench_dpo.py``'s rows, T = 512 with a prompt of T/4 and responses
  of 3T/4 (the mix where packing saves least: one short prompt, two long responses);
- ``imdb``: the shipped quickstart pairs (``data/quickstart/train.jsonl``: review openings of a few words and
  short sampled continuations), tokenised by the data module exactly as training does.

Configurations (each in a fresh subprocess, so its peak memory is its own):

- ``trl``: ``DPOTrainer.training_step`` (sigmoid DPO, β = 0.1; its collator pads every row to the batch's longest)
  + the same AdamW step as everybody;
- ``padded``: ``PreferenceModule`` with ``DPO(beta=0.1)`` on the padded layout (``collate_pairs``);
- ``packed``: the same on the packed layout, all pairs of a micro-batch in one row (``collate_packed``);
- ``packed_rows``: the packed layout with rows of at most ``--pack-length`` tokens;
- ``auto``: ``data.layout: auto``, padded or packed rows per micro-batch by the work estimate of
  ``sparsepo_lightning/data/layout_cost.py`` (for SmolLM2-135M; docs/performance.md).

Positions per pair: the positions the models run on (``R × L`` rows × columns; TRL: ``2B × longest row``), over
every micro-batch of the mix's pairs, divided by the number of pairs. Step time and memory: the median CPU (or
CUDA wall) seconds of a step and the resident-set high-water mark above the pre-step resident memory
(``bench_dpo.py``'s method), over the same ``--batches`` micro-batches. On CPU the model is SmolLM2-135M cut to its
first ``--layers`` blocks (full width and vocabulary), as ``bench_dpo.py`` does.

Run: ``python benchmarks/bench_packing.py`` (writes ``benchmarks/results/packing.json``), ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench_dpo import (  # benchmarks/ is on sys.path here
    LR,
    MODEL,
    _measure,
    _trl,
    allocator_setting,
    combine,
    model_path,
    rotated,
    token_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("trl", "padded", "packed", "packed_rows", "auto")
HH_MEDIANS = {"prompt": 186 * 2.15 / 3.15, "response": 186 / 3.15}
"""Median prompt and response tokens of HH-RLHF implied by the prefix-sharing paper's table (see above)."""
HH_SIGMAS = {"prompt": 0.6, "response": 0.7}
"""Spread (σ of the log-length) of the HH-like mix: an assumption of this benchmark."""
HH_CLIP = {"prompt": (16, 320), "response": (4, 192)}


# ---- workload --------------------------------------------------------------------------------------------
def _label(prompt: list[int], response: list[int]) -> list[int]:
    return [-100] * len(prompt) + response


def feature(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": _label(prompt, chosen),
            "rejected_input_ids": prompt + rejected, "rejected_labels": _label(prompt, rejected)}


def hh_features(num_pairs: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``num_pairs`` HH-like pairs (lengths drawn as the module docstring says)."""
    import math
    import random

    from sparsepo_lightning.model_sources import load_tokenizer

    rng = random.Random(seed)
    tokenizer = load_tokenizer(MODEL)
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/train.jsonl").read_text().splitlines() if line]
    stream = tokenizer(" ".join(r["prompt"] + r["chosen"] + r["rejected"] for r in rows))["input_ids"]

    def length(part: str) -> int:
        low, high = HH_CLIP[part]
        return min(high, max(low, round(math.exp(rng.gauss(math.log(HH_MEDIANS[part]), HH_SIGMAS[part])))))

    def cut(n: int) -> list[int]:
        start = rng.randrange(len(stream) - n)
        return stream[start : start + n]

    features = []
    for _ in range(num_pairs):
        prompt, chosen, rejected = cut(length("prompt")), cut(length("response")), cut(length("response"))
        if rejected[0] == chosen[0]:  # responses differ from their first token, as real pairs almost always do
            rejected = [chosen[0] + 1, *rejected[1:]]
        features.append(feature(prompt, chosen, rejected))
    return features


def imdb_features(num_pairs: int) -> list[dict[str, list[int]]]:
    """The first ``num_pairs`` quickstart pairs, tokenised as ``configs/quickstart.yaml`` trains on them."""
    from sparsepo_lightning.data import PreferenceDataModule

    dm = PreferenceDataModule(tokenizer=MODEL, train_file=str(ROOT / "data/quickstart/train.jsonl"), max_length=32,
                              max_prompt_length=16)
    dm.setup("fit")
    return [dict(f) for f in list(dm.datasets["train"])[:num_pairs]]


def features_of(mix: str, num_pairs: int) -> list[dict[str, list[int]]]:
    if mix == "side_by_side":  # bench_dpo.py's rows: T = 512, prompt T/4, chosen and rejected 3T/4 each
        return [feature(*pair) for pair in token_pairs(512, num_pairs)]
    return hh_features(num_pairs) if mix == "hh" else imdb_features(num_pairs)


def micro_batches(features: list, pairs_per_batch: int) -> list[list]:
    return [features[i : i + pairs_per_batch] for i in range(0, len(features), pairs_per_batch)]


def positions(config: str, batch: list, pack_length: int | None) -> int:
    """Positions the models run on for one micro-batch in ``config``'s layout."""
    from sparsepo_lightning.data.collate_packed import packed_cost, padded_cost

    if config == "packed":
        return packed_cost(batch)
    if config == "packed_rows":
        return packed_cost(batch, pack_length)
    if config == "auto":
        from sparsepo_lightning.data.layout_cost import PADDED, choose_layout, ratio_for

        choice = choose_layout(batch, ratio_for(MODEL))
        return padded_cost(batch) if choice == PADDED else packed_cost(batch, int(choice))
    return padded_cost(batch)  # padded and TRL: 2B rows x the longest


# ---- one configuration (worker process) ------------------------------------------------------------------
def _ours(config: str, device, model: str, pack_length: int | None):
    import torch

    from sparsepo_lightning.data.collate_packed import collate_packed
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import DPO
    from sparsepo_lightning.optim import parameter_groups

    module = PreferenceModule(model, objective=DPO(beta=0.1)).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(module.policy, module.masker, LR, 0.0, 0.01, None))

    def batch_of(features):
        if config == "auto":
            from sparsepo_lightning.data.layout_cost import collate_auto, ratio_for

            batch = collate_auto(features, pad_token_id=0, ratio=ratio_for(MODEL))
        else:
            batch = collate_packed(features, pad_token_id=0,
                                   pack_length=pack_length if config == "packed_rows" else None)
        if config == "padded":
            batch.packed = None
        fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
        fields["packed"] = None if batch.packed is None else batch.packed.to(device)
        return type(batch)(**fields)

    def step(batch):
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch_of


def _trl_step(device, num_pairs: int, model: str):
    step, batch_of_pairs, _ = _trl(device, num_pairs, model)

    def batch_of(features):
        pairs = []
        for f in features:
            prompt_len = sum(1 for label in f["chosen_labels"] if label == -100)
            pairs.append((f["chosen_input_ids"][:prompt_len], f["chosen_input_ids"][prompt_len:],
                          f["rejected_input_ids"][prompt_len:]))
        return batch_of_pairs(pairs)

    return step, batch_of


def worker(config: str, mix: str, num_pairs: int, batches: int, model: str, pack_length: int) -> dict:
    import torch

    from sparsepo_lightning.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as `sparsepo` does at start, in every configuration's process (TRL's too)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, batch_of = (_trl_step(device, num_pairs, model) if config == "trl"
                      else _ours(config, device, model, pack_length))
    groups = micro_batches(features_of(mix, num_pairs * batches), num_pairs)
    step(batch_of(groups[0][:1]))  # warm-up on one pair: AdamW state, first-call overheads
    rows = [_measure(step, batch_of(group), 1, device) for group in groups]
    return {"config": config, "mix": mix, "device": str(device), "pairs_per_batch": num_pairs,
            "batches": len(groups), "cpu_s": statistics.median(r["cpu_s"] for r in rows),
            "step_s": statistics.median(r["step_s"] for r in rows),
            "step_mem_mib": max(r["step_mem_mib"] for r in rows), "peak_mib": max(r["peak_mib"] for r in rows),
            "memory_source": rows[0]["memory_source"]}


# ---- driver ----------------------------------------------------------------------------------------------
def run_worker(config: str, mix: str, args: argparse.Namespace, model: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--mix", mix, "--pairs", str(args.pairs),
           "--batches", str(args.batches), "--pack-length", str(args.pack_length), "--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"config": config, "mix": mix, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def length_summary(features: list) -> dict[str, float]:
    """Median and 90th percentile of prompt and response tokens (prompt = the labels' -100 prefix)."""
    prompts = [sum(1 for x in f["chosen_labels"] if x == -100) for f in features]
    responses = [len(f[f"{side}_input_ids"]) - p for f, p in zip(features, prompts, strict=True)
                 for side in ("chosen", "rejected")]

    def q(values, p):
        return sorted(values)[min(len(values) - 1, int(p * len(values)))]

    return {"prompt_median": statistics.median(prompts), "prompt_p90": q(prompts, 0.9),
            "response_median": statistics.median(responses), "response_p90": q(responses, 0.9)}


def add_ratios(results: list[dict]) -> None:
    """Positions per pair, step time and step memory of every row as ratios to the padded layout's (same mix)."""
    base = {r["mix"]: r for r in results if r["config"] == "padded" and "error" not in r}
    for r in results:
        ref = base.get(r["mix"])
        if "error" in r or ref is None:
            continue
        key = "cpu_s" if r["device"] == "cpu" else "step_s"
        r["positions_vs_padded"] = r["positions_per_pair"] / ref["positions_per_pair"]
        r["time_vs_padded"] = r[key] / ref[key]
        r["mem_vs_padded"] = r["step_mem_mib"] / ref["step_mem_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 block, 2 pairs x 1 batch")
    parser.add_argument("--mixes", default="hh,imdb")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--batches", type=int, default=3, help="measured micro-batches per configuration")
    parser.add_argument("--count-pairs", type=int, default=512, help="pairs over which positions per pair are counted")
    parser.add_argument("--pack-length", type=int, default=512, help="row length of packed_rows")
    parser.add_argument("--layers", type=int, default=None, help="blocks of SmolLM2-135M (default 30 CUDA, 6 CPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of fresh processes per cell: medians, ratios to padded paired within a round, "
                             "with their range (use 3 at full depth on a CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/packing.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.mix, args.pairs, args.batches, args.model, args.pack_length)))
        return
    import torch

    cuda = torch.cuda.is_available()
    if args.quick:
        args.pairs, args.batches, args.count_pairs = 2, 1, 16
    layers = 1 if args.quick else args.layers or (30 if cuda else 6)
    model = model_path(None if layers == 30 else layers)
    load_before = os.getloadavg()
    mixes, counted, rounds = {}, {}, []
    mix_names, configs = args.mixes.split(","), args.configs.split(",")
    for mix in mix_names:
        features = features_of(mix, args.count_pairs)
        mixes[mix] = {"pairs": len(features), **length_summary(features)}
        groups = micro_batches(features, args.pairs)
        for config in configs:
            counted[config, mix] = sum(positions(config, g, args.pack_length) for g in groups) / len(features)
    for round_index in range(args.repeats):
        results = []
        for mix in mix_names:
            for config in rotated(configs, round_index):
                row = {**run_worker(config, mix, args, model), "positions_per_pair": counted[config, mix]}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        add_ratios(results)
        rounds.append(results)
    results = combine(rounds, keys=("config", "mix"))
    import trl

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "torch": torch.__version__,
            "trl": trl.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu", "model": MODEL,
            "layers": layers, "pairs_per_batch": args.pairs, "measured_batches": args.batches,
            "pack_length": args.pack_length, "mixes": mixes, "repeats": args.repeats,
            "cpu_memory": allocator_setting()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(json.dumps(meta))
    from tables import packing_table

    print(packing_table({"meta": meta, "results": results}))


if __name__ == "__main__":
    main()
