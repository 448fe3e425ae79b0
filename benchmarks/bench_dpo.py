"""Side-by-side training-step benchmark: TRL ``DPOTrainer`` vs our objectives vs the floor, same model and batch.

Every configuration runs in a fresh subprocess (so peak memory is its own), on SmolLM2-135M (alias
``smollm2-135m``, offline) with the same synthetic pairs: token streams cut from ``data/quickstart/train.jsonl``
to exact lengths (prompt ``T/4`` tokens, chosen and rejected ``3T/4`` tokens each), so every row is exactly
``T`` tokens and nobody pads. One measured step = forward + backward + AdamW step (lr 1e-6, no clipping).
On CPU the time ratios use the process's CPU
seconds (``time.process_time``, idle OpenMP threads sleep), which other jobs on a shared machine disturb far
less than wall seconds; wall seconds are reported too, and the kernel's share of the CPU seconds (``sys_s``) with
the minor page faults per step (``page_faults``): on a CPU, every large tensor that the allocator returns to the
system is faulted in and zeroed again at its next allocation, so a configuration's memory also costs it time.
Every worker first keeps freed memory in its process as ``sparsepo`` does (``sparsepo_lightning/cpu_memory.py``),
TRL's too, so that nobody pays that cost; ``SPARSEPO_CPU_MEMORY=system`` measures glibc's defaults instead
(``benchmarks/bench_cpu_memory.py`` compares the two).

- ``trl``: ``DPOTrainer.training_step`` (its defaults: sigmoid loss, β=0.1, fused LM head, metrics) + optimizer;
- ``floor``: the policy's own forward (all logits) + backward of ``logits.mean()`` + the reference forward
  under ``inference_mode`` + optimizer: what running the two models costs with no preference loss at all;
- ``dpo``, ``tdpo1``, ``mapo`` (SparsePO + ActivationMasker), ``sparsepo_common`` / ``sparsepo_indep``
  (SparsePO + LearnedMasker): ``PreferenceModule.training_step`` (default options) + backward + optimizer.

Reference cache against TRL's ``precompute_ref_log_probs`` (``--cached``: :data:`CACHED_CONFIGS`), each with a
match at equal settings (:data:`MATCH`, ratios ``time_vs_match`` / ``dynamic_vs_match``):

- ``dpo_cached``: DPO with ``reference_cache`` (``reference_cache.prepare`` over the batch's pairs before the timer,
  then the reference's weights released, as a fit does before training), against ``trl_precompute``
  (``precompute_ref_log_probs=True``: TRL computes the reference log-probs before the timer too, and then keeps no
  reference model);
- ``*_gc``: the same with gradient checkpointing (ours ``activation_checkpointing``, TRL's its default
  ``gradient_checkpointing=True``, enabled as its ``Trainer.train`` would); ``dpo`` / ``dpo_gc`` against ``trl`` /
  ``trl_gc`` (live references).

Dynamic memory: ``dynamic_mib`` = ``step_mem`` minus the gradients of the trainable weights (which the step
allocates and ``zero_grad(set_to_none=True)`` frees): the peak minus the static weights, gradients and optimizer
state, i.e. what activations, logits and temporaries cost. ``static_mib`` gives weights, gradients and optimizer
state as counted from the tensors.

Memory: CUDA uses ``torch.cuda.max_memory_allocated``. On CPU, tracemalloc does not see torch's allocations,
so the worker reads the kernel's resident-set high-water mark: after the warm-up step it records ``VmRSS``,
resets ``VmHWM`` (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM`` after the measured steps. ``step_mem``
is that peak minus the resident memory before the step (activations, logits, gradients, temporaries); the
resident part (weights of both models + AdamW state, identical for all configurations) is reported as
``resident``. Without ``clear_refs`` the worker falls back to ``getrusage`` max RSS of the process.

Repeats: ``--repeats R`` runs every configuration in R rounds of fresh processes (each round starting one
configuration later); every value is the median over the rounds, every ratio the median of the ratios paired within
a round, with the range of the rounds beside it (:func:`combine`). On a shared or drifting machine a single round
can move a ratio by 20 %; ``--full-depth`` defaults to 3 rounds.

Run: ``python benchmarks/bench_dpo.py`` (full, lengths 128/512/1024) or ``--quick`` (a smoke run); ``--full-depth``
for all 30 blocks at T = 512 with 4 pairs (slow on a CPU: ``docs/performance.md`` says how slow).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from proc_status import status_kib  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("trl", "floor", "dpo", "tdpo1", "mapo", "sparsepo_common", "sparsepo_indep")
CACHED_CONFIGS = ("trl", "dpo", "trl_gc", "dpo_gc", "trl_precompute", "dpo_cached", "trl_precompute_gc",
                  "dpo_cached_gc")
MATCH = {"dpo": "trl", "dpo_gc": "trl_gc", "dpo_cached": "trl_precompute", "dpo_cached_gc": "trl_precompute_gc"}
"""Our configuration -> TRL's at equal settings (reference live or precomputed, checkpointing on or off)."""
MODEL = "smollm2-135m"
LR = 1e-6
WARMUP_LENGTH = 32
"""The warm-up step (gradients, AdamW state, first-call overheads) runs on this length: it costs little."""


# ---- workload --------------------------------------------------------------------------------------------
def model_path(layers: int | None) -> str:
    """The alias itself, or a checkpoint of SmolLM2-135M cut to its first ``layers`` blocks (same d, same V).

    A CPU cannot run the 30-block model at T=1024 for 7 configurations in minutes; the cut model keeps the
    full-vocabulary head (V = 49152, d = 576), which is what token statistics are about.
    """
    if layers is None:
        return MODEL
    out = ROOT / "data/cache/bench" / f"{MODEL}-{layers}layers"
    if not (out / "config.json").exists():
        from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer

        model = load_causal_lm(MODEL)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        model.save_pretrained(out)
        load_tokenizer(MODEL).save_pretrained(out)
    return str(out)


def token_pairs(length: int, num_pairs: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``num_pairs`` (prompt, chosen, rejected) id lists of exact lengths ``T/4``, ``3T/4``, ``3T/4``."""
    from sparsepo_lightning.model_sources import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/train.jsonl").read_text().splitlines() if line]
    stream = tokenizer(" ".join(r["prompt"] + r["chosen"] + r["rejected"] for r in rows))["input_ids"]
    prompt_len = length // 4
    need = (prompt_len + 2 * (length - prompt_len)) * num_pairs
    stream = (stream * (need // len(stream) + 1))[:need]
    pairs, at = [], 0
    for _ in range(num_pairs):
        prompt, at = stream[at:at + prompt_len], at + prompt_len
        chosen, at = stream[at:at + length - prompt_len], at + length - prompt_len
        rejected, at = stream[at:at + length - prompt_len], at + length - prompt_len
        pairs.append((prompt, chosen, rejected))
    return pairs


def preference_batch(pairs, device):
    import torch

    from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch

    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    ids = torch.tensor(rows, device=device)
    labels = ids.clone()
    for i, (prompt, _, _) in enumerate(pairs * 2):
        labels[i, :len(prompt)] = IGNORE_INDEX
    return PreferenceBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


# ---- one configuration (worker process) ------------------------------------------------------------------
def _ours(name: str, device, model: str):
    import torch

    from sparsepo_lightning.masks.activation import ActivationMasker
    from sparsepo_lightning.masks.learned import LearnedMasker
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import DPO, TDPO1, SparsePO
    from sparsepo_lightning.optim import parameter_groups

    base, checkpointing = name.removesuffix("_gc"), name.endswith("_gc")
    objective, masker = {
        "dpo": (DPO(), None), "dpo_cached": (DPO(), None), "tdpo1": (TDPO1(), None),
        "mapo": (SparsePO(), ActivationMasker()), "sparsepo_common": (SparsePO(), LearnedMasker()),
        "sparsepo_indep": (SparsePO(), LearnedMasker(True)),
    }[base]
    module = PreferenceModule(model, objective=objective, masker=masker, activation_checkpointing=checkpointing,
                              reference_cache=base == "dpo_cached").to(device)
    module.configure_model()  # as Lightning does before configure_optimizers: wraps the blocks for checkpointing
    optimizer = torch.optim.AdamW(parameter_groups(module.policy, module.masker, LR, 0.0, 0.01, None))

    def step(batch):
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def batch_of(pairs):
        batch = preference_batch(pairs, device)
        if base == "dpo_cached":  # the cache of these pairs, built before the timer as a fit builds it before training
            module._cache.cache = _cache_of(module, pairs)
            batch.row_ids = tuple(range(len(pairs)))
        return batch

    return step, batch_of, ([module.policy, module.reference, module.masker], optimizer)


def _cache_of(module, pairs):
    """``reference_cache.prepare`` over ``pairs`` as the training split of a one-rank run (in a temporary folder)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from sparsepo_lightning import reference_cache, reference_release
    from sparsepo_lightning.data.collate import collate_pairs

    os.environ.setdefault("SPARSEPO_TOKENISED_CACHE", tempfile.mkdtemp())
    features = [{"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c, "rejected_input_ids": p + r,
                 "rejected_labels": [-100] * len(p) + r} for p, c, r in pairs]
    data = SimpleNamespace(datasets={"train": features}, collate_fn=collate_pairs, pad_token_id=0,
                           batch_size=len(pairs), cache_tokenised=False)
    trainer = SimpleNamespace(datamodule=data, global_rank=0, world_size=1,
                              strategy=SimpleNamespace(barrier=lambda *_: None))
    cache = reference_cache.prepare(module, trainer, ("reference_logps",))
    single = SimpleNamespace(strategy=SingleDeviceStrategy(device=module.device), callbacks=[])
    reference_release.release(module, single)  # as a single-device fit does once the cache serves it
    return cache


def _floor(device, model: str):
    import torch

    from sparsepo_lightning.model_sources import load_causal_lm

    policy, reference = load_causal_lm(model).to(device).train(), load_causal_lm(model).to(device).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)

    def step(batch):
        policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.mean().backward()
        with torch.inference_mode():
            reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda pairs: preference_batch(pairs, device), ([policy, reference], optimizer)


def _trl(device, num_pairs: int, model: str, checkpointing: bool = False, precompute: bool = False):
    import logging

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = load_tokenizer(MODEL)
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * num_pairs)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=num_pairs, learning_rate=LR,
                     max_length=None, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
                     dataloader_num_workers=0, max_grad_norm=0.0, bf16=False, fp16=False,
                     gradient_checkpointing=checkpointing, precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=load_causal_lm(model), ref_model=None if precompute else load_causal_lm(model),
                         args=args, train_dataset=text, processing_class=tokenizer)
    model = trainer.model
    if checkpointing:  # what Trainer.train does first (we call training_step directly)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    # The same optimizer as every other configuration (TRL would pick its own default); no clipping anywhere.
    trainer.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we do not run

    def batch_of(pairs):
        examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
        if precompute:  # as TRL's precompute pass over the dataset: before the timer, with the initial policy
            chosen, rejected = trainer.compute_ref_log_probs(model, _on(trainer.data_collator(examples), device))
            for example, c, r in zip(examples, chosen.tolist(), rejected.tolist(), strict=True):
                example.update(ref_chosen_logps=c, ref_rejected_logps=r)
        return _on(trainer.data_collator(examples), device)

    def step(batch):
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, batch_of, ([model, trainer.ref_model], trainer.optimizer)


def _on(collated: dict, device) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}


def static_mib(models, optimizer) -> dict:
    """Weights (all models; not a released reference's, on the meta device), gradients (of the optimizer's
    parameters) and optimizer state, from the tensors."""
    import torch

    params = {id(p): p for m in models if m is not None for p in m.parameters() if not p.is_meta}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"weights_mib": weights / 2**20, "grads_mib": grads / 2**20, "optimizer_mib": state / 2**20}


def _measure(step, batch, steps: int, device) -> dict:
    """Median step time and peak memory of ``steps`` steps, from a just-collected resident state."""
    import torch

    gc.collect()
    cpu_hwm = False
    if device.type == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            cpu_hwm = True
        except OSError:
            pass
    times, cpu_times, sys_times, faults = [], [], [], []
    for _ in range(steps):
        start, cpu_start, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        sys_times.append(after.ru_stime - usage.ru_stime)  # kernel time: mostly zeroing freshly faulted pages
        faults.append(after.ru_minflt - usage.ru_minflt)
    if device.type == "cuda":
        peak, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    elif cpu_hwm:
        peak, source = status_kib("VmHWM") * 1024, "VmHWM_after_clear_refs"
    else:  # whole-process high-water mark (includes model loading): an upper bound
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    mib = 2**20
    return {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
            "sys_s": statistics.median(sys_times), "page_faults": float(statistics.median(faults)),
            "step_mem_mib": (peak - resident) / mib, "peak_mib": peak / mib,
            "resident_mib": resident / mib, "memory_source": source}


def worker(name: str, lengths: list[int], num_pairs: int, warmup: int, steps: int, model: str) -> list[dict]:
    """Measure one configuration at each length, shortest first, in this (fresh) process.

    The peak is reset before each length, so lengths do not see each other's memory; the models and the
    optimizer are loaded once (loading dominates a CPU run otherwise).
    """
    import torch

    from sparsepo_lightning.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as `sparsepo` does at start; for every configuration, TRL's too (SPARSEPO_CPU_MEMORY)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("trl"):
        step, batch_of, parts = _trl(device, num_pairs, model, name.endswith("_gc"), "precompute" in name)
    else:
        step, batch_of, parts = _floor(device, model) if name == "floor" else _ours(name, device, model)
    warmup_batch = batch_of(token_pairs(WARMUP_LENGTH, num_pairs))
    for _ in range(warmup):  # allocates AdamW state; first-call overheads
        step(warmup_batch)
    results = []
    for length in sorted(lengths):
        batch = batch_of(token_pairs(length, num_pairs))
        row = {"config": name, "length": length, "pairs": num_pairs, "device": str(device)}
        measured, static = _measure(step, batch, steps, device), static_mib(*parts)
        dynamic = measured["step_mem_mib"] - static["grads_mib"]
        results.append({**row, **measured, "dynamic_mib": dynamic, "static_mib": static})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


# ---- driver ----------------------------------------------------------------------------------------------
def run_config(name: str, lengths: list[int], num_pairs: int, warmup: int, steps: int, model: str,
               timeout: float, env: dict[str, str] | None = None) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", name, "--lengths", ",".join(map(str, lengths)),
           "--pairs", str(num_pairs), "--warmup", str(warmup), "--steps", str(steps), "--model", model]
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so process CPU time counts work, not waiting.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
           **(env or {})}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        finished = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        done_lengths = {r["length"] for r in finished}
        return finished + [{"config": name, "length": n, "error": f"timeout after {timeout:.0f}s"}
                           for n in lengths if n not in done_lengths]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode or not lines:
        error = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return [{"config": name, "length": n, "error": error} for n in lengths]
    return json.loads(lines[-1])


def add_ratios(results: list[dict]) -> None:
    """Step time and step memory of every row as ratios to TRL's and to the floor's at the same length, and to its
    match (:data:`MATCH`), all within one round of fresh processes.

    Time ratios use process CPU seconds on CPU (robust to other jobs on a shared machine; wall seconds are
    kept in the results) and wall seconds on CUDA.
    """
    by_key = {(r["config"], r["length"]): r for r in results if "error" not in r}
    for r in results:
        for base in ("trl", "floor"):
            ref = by_key.get((base, r["length"]))
            if "error" in r or ref is None:
                continue
            key = "cpu_s" if r["device"] == "cpu" else "step_s"
            r[f"time_vs_{base}"] = r[key] / ref[key]
            r[f"mem_vs_{base}"] = r["step_mem_mib"] / ref["step_mem_mib"]
            r[f"peak_vs_{base}"] = r["peak_mib"] / ref["peak_mib"]
        match = by_key.get((MATCH.get(r["config"]), r["length"]))
        if "error" not in r and match is not None:
            key = "cpu_s" if r["device"] == "cpu" else "step_s"
            r["time_vs_match"], r["dynamic_vs_match"] = r[key] / match[key], r["dynamic_mib"] / match["dynamic_mib"]
            r["peak_vs_match"] = r["peak_mib"] / match["peak_mib"]


def rotated(names: list[str], round_index: int) -> list[str]:
    """``names`` starting ``round_index`` places later, so no configuration always runs first or last in a round."""
    start = round_index % len(names)
    return names[start:] + names[:start]


def allocator_setting() -> str:
    """What every worker's ``keep_freed_memory`` will do here (``SPARSEPO_CPU_MEMORY``, ``keep`` by default)."""
    from sparsepo_lightning.cpu_memory import ENV

    return os.environ.get(ENV, "keep")


def combine(rounds: list[list[dict]], keys: tuple[str, ...] = ("config", "length")) -> list[dict]:
    """One row per cell (``keys``: configuration and length) from repeated rounds, each with its ratios (from
    :func:`add_ratios`; ``bench_packing.py`` keys its cells by configuration and mix).

    Every measured value and every ratio is the median over the rounds where the row ran without error; a ratio is
    paired, taken within a round (both processes ran back to back) before the median, so a machine that drifts
    between rounds moves both sides of it. ``<key>_range`` holds the smallest and largest round's value and
    ``repeats`` the number of rounds behind the medians. A row that failed in every round keeps its last error.
    """
    rows: dict[tuple, list[dict]] = {}
    for results in rounds:
        for r in results:
            rows.setdefault(tuple(r[k] for k in keys), []).append(r)
    combined = []
    for repeats in rows.values():
        good = [r for r in repeats if "error" not in r]
        if not good:
            combined.append(repeats[-1])
            continue
        row = {k: v for k, v in good[0].items() if not isinstance(v, float)}
        for key in (k for k, v in good[0].items() if isinstance(v, float)):
            values = [r[key] for r in good if key in r]
            row[key] = statistics.median(values)
            if len(good) > 1:
                row[f"{key}_range"] = [min(values), max(values)]
        row["repeats"] = len(good)
        combined.append(row)
    return combined


def table(results: list[dict]) -> str:
    head = ("| T | config | wall s | CPU s | ×TRL time | ×floor time | step MiB | dynamic MiB | ×TRL mem | ×floor mem "
            "| peak MiB | ×TRL peak | ×match time | ×match dynamic |")
    lines = [head, "|---" * 14 + "|"]
    nan = float("nan")
    for r in sorted(results, key=lambda r: r["length"]):
        if "error" in r:
            lines.append(f"| {r['length']} | {r['config']} | error: {r['error']} |" + " |" * 11)
            continue
        lines.append(f"| {r['length']} | {r['config']} | {r['step_s']:.2f} | {r['cpu_s']:.2f} "
                     f"| {r.get('time_vs_trl', nan):.2f} | {r.get('time_vs_floor', nan):.2f} | {r['step_mem_mib']:.0f} "
                     f"| {r.get('dynamic_mib', nan):.0f} | {r.get('mem_vs_trl', nan):.2f} "
                     f"| {r.get('mem_vs_floor', nan):.2f} | {r['peak_mib']:.0f} | {r.get('peak_vs_trl', nan):.2f} "
                     f"| {r.get('time_vs_match', nan):.2f} | {r.get('dynamic_vs_match', nan):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=64, 1 pair, 1 block, 1 measured step")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 128,512,1024)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per batch (default 1 on CPU, 4 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 3 on CPU, 5 on CUDA)")
    parser.add_argument("--configs", default=None, help=f"default: {','.join(CONFIGS)}")
    parser.add_argument("--cached", action="store_true",
                        help=f"reference cache vs TRL precompute_ref_log_probs: {','.join(CACHED_CONFIGS)}")
    parser.add_argument("--full-depth", action="store_true",
                        help="all 30 blocks, T = 512, 4 pairs (slow on a CPU; docs/performance.md)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of fresh processes per configuration; medians of paired ratios, with their "
                             "range (default 3 with --full-depth, else 1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/latest.json"))
    parser.add_argument("--layers", type=int, default=None,
                        help="cut SmolLM2-135M to its first N blocks (default: 30 on CUDA, 2 on CPU, 1 with --quick)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        lengths = [int(x) for x in args.lengths.split(",")]
        print(json.dumps(worker(args.worker, lengths, args.pairs, args.warmup, args.steps, args.model)))
        return
    import torch

    load_before = os.getloadavg()
    cuda = torch.cuda.is_available()
    default_lengths = "512" if args.full_depth else "128,512,1024"
    lengths = [64] if args.quick else [int(x) for x in (args.lengths or default_lengths).split(",")]
    num_pairs = args.pairs or (1 if args.quick or not (cuda or args.full_depth) else 4)
    steps = args.steps or (1 if args.quick else 5 if cuda else 3)
    layers = args.layers or (1 if args.quick else 30 if args.full_depth else None if cuda else 2)
    configs = args.configs or ",".join(CACHED_CONFIGS if args.cached else CONFIGS)
    repeats = args.repeats or (3 if args.full_depth else 1)
    model = model_path(layers if layers != 30 else None)
    names, rounds = configs.split(","), []
    for round_index in range(repeats):
        results = []
        for name in rotated(names, round_index):
            results += run_config(name, lengths, num_pairs, args.warmup, steps, model, timeout=900)
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        add_ratios(results)
        rounds.append(results)
    results = combine(rounds)
    import trl

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "torch": torch.__version__,
            "trl": trl.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "pairs": num_pairs, "steps": steps,
            "warmup": args.warmup, "warmup_length": WARMUP_LENGTH, "repeats": repeats,
            "model": MODEL, "layers": layers or 30, "cpu_memory": allocator_setting()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(json.dumps(meta))
    print(table(results))


if __name__ == "__main__":
    main()
