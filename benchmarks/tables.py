"""Render the documentation's measurement tables from ``benchmarks/results/*.json``.

A page (``README.md``, ``benchmarks/README.md``, ``docs/*.md``) holds each table between ``<!-- table: <name> -->``
and ``<!-- end table -->``; this script rewrites those blocks from the result files (every row of each file), so no
page ever carries a number by hand.

    python benchmarks/tables.py           # rewrite the tables in every page that holds one
    python benchmarks/tables.py --check   # exit 1 if a page differs from what the results give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def pages() -> list[Path]:
    """The Markdown pages that hold at least one table block."""
    candidates = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in candidates if p.is_file() and "<!-- table: " in p.read_text()]

CONFIG_NAMES = {"trl": "TRL DPOTrainer", "floor": "floor (no loss)", "dpo": "DPO", "tdpo1": "TDPO1", "mapo": "MaPO",
                "sparsepo_common": "SparsePO (common)", "sparsepo_indep": "SparsePO (indep.)",
                "dpo_gc": "DPO, checkpointing", "trl_gc": "TRL, checkpointing", "dpo_cached": "DPO, cached reference",
                "trl_precompute": "TRL, precompute_ref_log_probs",
                "dpo_cached_gc": "DPO, cached reference, checkpointing",
                "trl_precompute_gc": "TRL, precompute_ref_log_probs, checkpointing"}


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def step_table() -> str:
    """One row per (length, config) of ``latest.json`` (``bench_dpo.py``), in the file's order within a length."""
    data = _load("latest.json")
    meta = data["meta"]
    load = lambda values: f"{values[0]:.1f}"  # noqa: E731  (1-minute load average)
    lines = [f"Source: `benchmarks/results/latest.json` ({meta['date'][:10]}, {meta['device']}, "
             f"{meta['cpu_count']} cores, load {load(meta['load_avg_before'])} → {load(meta['load_avg_after'])}, "
             f"torch {meta['torch']}, TRL {meta['trl']}; {meta['model']} cut to {meta['layers']} blocks, "
             f"{meta['pairs']} pair, {meta['steps']} measured steps; {_allocator(meta)}).", "",
             "| T | config | CPU s | ×TRL time | ×floor time | step MiB | ×TRL step memory | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    rows = sorted(data["results"], key=lambda r: r["length"])  # stable: keeps the file's config order
    for r in rows:
        lines.append(f"| {r['length']} | {CONFIG_NAMES.get(r['config'], r['config'])} | {r['cpu_s']:.2f} | "
                     f"{r['time_vs_trl']:.2f} | {r['time_vs_floor']:.2f} | {r['step_mem_mib']:.0f} | "
                     f"{r['mem_vs_trl']:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def cached_table() -> str:
    """Our DPO against TRL's ``DPOTrainer`` at equal settings (``cached.json``, ``bench_dpo.py --cached``): the live
    reference, the reference cache against TRL's ``precompute_ref_log_probs``, each with and without gradient
    checkpointing; throughput = TRL's CPU seconds per step / ours."""
    data = _load("cached.json")
    meta = data["meta"]
    by_config = {r["config"]: r for r in data["results"] if "error" not in r}
    lines = [f"Source: `benchmarks/results/cached.json` ({meta['date'][:10]}, {meta['device']}, {meta['cpu_count']} "
             f"cores, torch {meta['torch']}, TRL {meta['trl']}; {meta['model']}, {meta['layers']} blocks, "
             f"T = {data['results'][0]['length']}, {meta['pairs']} pairs, {meta['steps']} measured steps; "
             f"{_allocator(meta)}{_rounds(meta, 'throughput from ratios')}).", "",
             "| ours | TRL at equal settings | ours CPU s | TRL CPU s | throughput ×TRL | dynamic memory ×TRL |",
             "|---|---|---|---|---|---|"]
    for ours, theirs in (("dpo", "trl"), ("dpo_gc", "trl_gc"), ("dpo_cached", "trl_precompute"),
                         ("dpo_cached_gc", "trl_precompute_gc")):
        if ours in by_config and theirs in by_config:
            a, b = by_config[ours], by_config[theirs]
            ratio = a.get("time_vs_match", a["cpu_s"] / b["cpu_s"])  # ours / TRL's, paired per round
            spread = (f" [{1 / a['time_vs_match_range'][1]:.2f}–{1 / a['time_vs_match_range'][0]:.2f}]"
                      if "time_vs_match_range" in a else "")
            lines.append(f"| {CONFIG_NAMES.get(ours, ours)} | {CONFIG_NAMES.get(theirs, theirs)} | {a['cpu_s']:.1f} | "
                         f"{b['cpu_s']:.1f} | {1 / ratio:.2f}{spread} | "
                         f"{a['dynamic_mib'] / b['dynamic_mib']:.2f} |")
    return "\n".join(lines)


def _rounds(meta: dict, ratios: str) -> str:
    """The source line's words for results of several rounds (``--repeats``); nothing for one round."""
    repeats = meta.get("repeats", 1)
    return f"; medians of {repeats} rounds, {ratios} paired within a round [range of the rounds]" if repeats > 1 else ""


def _spread(row: dict, key: str) -> str:
    """`` [low–high]`` over the rounds behind a median ratio, where there were several."""
    low, high = row.get(f"{key}_range", (None, None))
    return "" if low is None or low == high else f" [{low:.2f}–{high:.2f}]"


def _allocator(meta: dict) -> str:
    """How the run's processes allocated CPU memory (``bench_dpo.py`` records ``cpu_memory`` since it sets it)."""
    if meta.get("device", "cpu") != "cpu":
        return "CUDA caching allocator"
    if meta.get("cpu_memory", "system") == "keep":
        return "every process keeps freed memory (SPARSEPO_CPU_MEMORY=keep)"
    return "glibc's default allocator in every process, under which large temporaries cost kernel time every step"


STUDY = ROOT / "reports" / "sentiment_controls"
_PARTIAL = re.compile(r"^\*\*Partial study: (\d+) of (\d+) planned runs are evaluated\.\*\*", re.M)
_SENTENCE = re.compile(r"^\*\*In one sentence:\*\* (.+)$", re.M)


def controls_study() -> str:
    """The controls study's conclusion in one sentence, quoted from its generated report (``sparsepo study sentiment
    report``, held to its logs by tests/test_study.py), with the share of its runs behind it while the study is
    partial."""
    text = (STUDY / "README.md").read_text()
    sentence = _SENTENCE.search(text)
    if sentence is None:
        raise ValueError(f"{STUDY / 'README.md'} has no '**In one sentence:**' line; regenerate the report")
    partial = _PARTIAL.search(text)
    status = (f"partial, {partial.group(1)} of {partial.group(2)} planned runs evaluated so far" if partial
              else "all planned runs")
    return (f"The controls study ([reports/sentiment_controls](reports/sentiment_controls/README.md), {status}), "
            f"in its report's words: *{sentence.group(1)}*")


def packing_summary() -> str:
    """One sentence on ``data.layout: auto`` against padded at full depth, from ``packing_full_depth.json``."""
    data = _load("packing_full_depth.json")
    auto = {r["mix"]: r for r in data["results"] if r["config"] == "auto" and "error" not in r}
    names = {"hh": "the HH-like mix", "imdb": "the quickstart pairs", "side_by_side": "the side-by-side rows"}
    ratios = [f"{r['time_vs_padded']:.2f}×{_spread(r, 'time_vs_padded')} on {names.get(m, m)}"
              for m, r in auto.items()]
    listed = ", ".join(ratios[:-1]) + f" and {ratios[-1]}" if len(ratios) > 1 else "".join(ratios)
    return (f"With `data.layout: auto` (the HH and TL;DR recipes' layout), the CPU time of a full-depth step, relative "
            f"to the padded layout's, is {listed} (`benchmarks/results/packing_full_depth.json`, medians of "
            f"{data['meta'].get('repeats', 1)} rounds [their range]; [docs/performance.md](docs/performance.md)).")


def cpu_memory_table() -> str:
    """``cpu_memory.json`` (``bench_cpu_memory.py``): one step with freed memory kept against glibc's defaults."""
    data = _load("cpu_memory.json")
    meta = data["meta"]
    lines = [f"Source: `benchmarks/results/cpu_memory.json` ({meta['date'][:10]}, cpu, {meta['cpu_count']} cores, "
             f"torch {meta['torch']}, TRL {meta['trl']}; {meta['model']}, {meta['layers']} blocks, "
             f"T = {meta['length']}, "
             f"{meta['pairs']} pairs, {meta['steps']} measured steps; medians of {meta['repeats']} rounds, the ratio "
             "paired within a round [range of the rounds]).", "",
             "| step | CPU s, glibc defaults | CPU s, kept | × CPU s | kernel s, defaults → kept "
             "| page faults / step, defaults → kept | peak MiB, defaults → kept |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if r["cpu_keep_vs_system"] is None:
            lines.append(f"| {CONFIG_NAMES.get(r['config'], r['config'])} | no pair of cells ran | | | | | |")
            continue
        low, high = r["cpu_keep_vs_system_range"]
        lines.append(f"| {CONFIG_NAMES.get(r['config'], r['config'])} | {r['cpu_s_system']:.2f} "
                     f"| {r['cpu_s_keep']:.2f} | {r['cpu_keep_vs_system']:.2f} [{low:.2f}–{high:.2f}] "
                     f"| {r['sys_s_system']:.2f} → {r['sys_s_keep']:.2f} "
                     f"| {r['page_faults_system']:,.0f} → {r['page_faults_keep']:,.0f} "
                     f"| {r['peak_mib_system']:.0f} → {r['peak_mib_keep']:.0f} |")
    return "\n".join(lines)


def memory_table() -> str:
    """Every (length, method) row of ``memory.json`` (``bench_memory.py``), one line per length."""
    data = _load("memory.json")
    methods = list(dict.fromkeys(r["method"] for r in data["results"]))
    lengths = sorted({r["length"] for r in data["results"]})
    value = {(r["length"], r["method"]): r["peak_extra_mib"] for r in data["results"]}
    names = {"naive": "naive full log-softmax", "checkpoint": "checkpointed chunks", "fused": "fused chunks"}
    lines = [f"Source: `benchmarks/results/memory.json` (V = {data['vocab']}, d = {data['hidden']}, "
             f"chunk_size {data['chunk_size']}; extra peak memory of the statistics, `peak_extra_mib`).", "",
             "| T | " + " | ".join(names.get(m, m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for length in lengths:
        cells = [f"{value[(length, m)]:.0f} MiB" if (length, m) in value else "–" for m in methods]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distribution_memory_table() -> str:
    """Every length of ``distribution_memory.json`` (``bench_distribution_memory.py``): AlignDistil against the
    fused KL path, with their ratio."""
    data = _load("distribution_memory.json")
    value = {(r["length"], r["method"]): r["peak_extra_mib"] for r in data["results"]}
    lines = [f"Source: `benchmarks/results/distribution_memory.json` (V = {data['vocab']}, d = {data['hidden']}, "
             f"chunk_size {data['chunk_size']}; extra peak memory, the largest of the fresh processes per cell).", "",
             "| T | fused KL (baseline) | AlignDistil | ratio |", "|---|---|---|---|"]
    for length in sorted({r["length"] for r in data["results"]}):
        base, ours = value[(length, "fused_kl")], value[(length, "aligndistil")]
        lines.append(f"| {length} | {base:.0f} MiB | {ours:.0f} MiB | {ours / base:.2f}× |")
    return "\n".join(lines)


def sparsity_table() -> str:
    """Every target of ``sparsity.json`` (``sparsity.py``): the quickstart with a learned mask at a set share of exact
    zeros, at its last validation, with the criteria the script checks."""
    data = _load("sparsity.json")
    lines = ["Source: `benchmarks/results/sparsity.json` (the quickstart recipe with `configs/sparsity/learned.yaml`; "
             "validation responses at the last step).", "",
             "| target | exact zeros | mean kept weight | accuracy | margin at step 16 → end | criteria met |",
             "|---|---|---|---|---|---|"]
    for entry in sorted(data.values(), key=lambda e: e["target_sparsity"]):
        met = [name for name, ok in entry["checks"].items() if ok]
        lines.append(f"| {entry['target_sparsity']:.1f} | {entry['zeros_percent']:.1f} % | "
                     f"{entry['mean_kept_weight']:.3f} | {entry['accuracy']:.3f} | "
                     f"{entry['margin_step_16']:.4f} → {entry['margin_final']:.4f} | {len(met)} of "
                     f"{len(entry['checks'])}" + ("" if len(met) == len(entry["checks"]) else
                     " (not: " + ", ".join(n for n in entry["checks"] if n not in met) + ")") + " |")
    return "\n".join(lines)


def loading_table() -> str:
    """Every rank of every run of ``loading.json`` (``bench_loading.py``)."""
    data = _load("loading.json")
    lines = [f"Source: `benchmarks/results/loading.json` ({data['model']}, {data['world_size']} ranks; "
             "peak anonymous memory per rank).", "",
             "| model dtype | rank | own shards MiB | `from_pretrained` peak MiB | `meta_init` peak MiB "
             "| meta / eager |",
             "|---|---|---|---|---|---|"]
    for dtype, run in data["runs"].items():
        eager, meta = run["rows"]["from_pretrained"], run["rows"]["meta_init"]
        for rank, (e, m, ratio) in enumerate(zip(eager, meta, run["peak_ratio"], strict=True)):
            lines.append(f"| {dtype} | {rank} | {e['local_shards_mib']:.0f} | {e['peak_mib']:.0f} | "
                         f"{m['peak_mib']:.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def statistics_table() -> str:
    """``statistics.json`` (``bench_statistics.py``): what the default exact statistics cost on the quickstart, timed
    inside the run (their hooks) and end to end (paired runs with and without them)."""
    data = _load("statistics.json")
    median = data["median_seconds_per_step"]
    return "\n".join([
        f"Source: `benchmarks/results/statistics.json` ({data['recipe']}, {data['steps']} optimizer steps per run, "
        f"the first {data['skip']} left out, {data['repeats']} runs per arm alternating).", "",
        "| s / step with the statistics | in their hooks | share of the step | without | end to end: median "
        "paired overhead (min to max) |",
        "|---|---|---|---|---|",
        f"| {median['with_statistics']:.3f} | {data['hook_seconds_per_step']:.3f} | {data['hook_share']:.1%} "
        f"(max {data['hook_share_max']:.1%}) | {median['without']:.3f} | {data['overhead']:+.1%} "
        f"({data['overhead_min']:+.1%} to {data['overhead_max']:+.1%}) |"])


LAYOUT_NAMES = {"trl": "TRL DPOTrainer", "padded": "padded", "packed": "packed (one row)",
                "packed_rows": "packed (rows ≤ pack_length)", "auto": "auto (chosen per micro-batch)"}


def packing_table(data: dict | None = None, name: str = "packing.json") -> str:
    """Every (mix, config) row of ``name`` (``bench_packing.py``), ratios to the padded layout."""
    data = data or _load(name)
    meta = data["meta"]
    mixes = "; ".join(f"{name}: prompt median {m['prompt_median']:g} (p90 {m['prompt_p90']}), response median "
                      f"{m['response_median']:g} (p90 {m['response_p90']}) tokens" for name, m in meta["mixes"].items())
    lines = [f"Source: `benchmarks/results/{name}` ({meta['date'][:10]}, {meta['device']}, "
             f"{meta['cpu_count']} cores, load {meta['load_avg_before'][0]:.1f} → {meta['load_avg_after'][0]:.1f}, "
             f"torch {meta['torch']}, TRL {meta['trl']}; {meta['model']}, {meta['layers']} blocks, "
             f"DPO β 0.1, {meta['pairs_per_batch']} pairs per micro-batch, median of {meta['measured_batches']} "
             f"micro-batches; pack_length {meta['pack_length']}; {_allocator(meta)}{_rounds(meta, 'time ratios')}). "
             f"Mixes: {mixes}.", "",
             "| mix | layout | positions / pair | × padded | CPU s / step | × padded | step MiB | × padded |",
             "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in data["results"]:
        name = LAYOUT_NAMES.get(r["config"], r["config"])
        if "error" in r:
            lines.append(f"| {r['mix']} | {name} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['mix']} | {name} | {r['positions_per_pair']:.0f} | {r.get('positions_vs_padded', nan):.2f} "
                     f"| {r['cpu_s']:.2f} | {r.get('time_vs_padded', nan):.2f}{_spread(r, 'time_vs_padded')} "
                     f"| {r['step_mem_mib']:.0f} "
                     f"| {r.get('mem_vs_padded', nan):.2f} |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"step": step_table, "memory": memory_table, "loading": loading_table,
                                        "distribution_memory": distribution_memory_table, "sparsity": sparsity_table,
                                        "cached": cached_table, "statistics": statistics_table,
                                        "packing": packing_table, "cpu_memory": cpu_memory_table,
                                        "controls_study": controls_study,
                                        "packing_full_depth": lambda: packing_table(name="packing_full_depth.json"),
                                        "packing_summary": packing_summary}
_BLOCK = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- end table -->)", re.S)


def render(text: str) -> str:
    """``text`` with every table block replaced by its freshly rendered table."""
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise KeyError(f"a page names an unknown table {name!r}; known: {sorted(TABLES)}")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"
    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page's tables are out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(fresh)
    if args.check and stale:
        pages_named = ", ".join(map(str, stale))
        print(f"tables in {pages_named} differ from benchmarks/results/; run python benchmarks/tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
