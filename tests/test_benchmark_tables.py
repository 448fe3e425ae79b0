"""The documentation's measurement tables are generated from ``benchmarks/results/`` and show every row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def test_page_tables_match_the_result_files():
    for page in tables.pages():
        text = page.read_text()
        assert tables.render(text) == text, f"{page.relative_to(ROOT)}: run python benchmarks/tables.py"


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_some_page_holds_each_table(name):
    assert any(f"<!-- table: {name} -->" in page.read_text() for page in tables.pages())


def test_every_result_row_is_shown():
    step = tables.step_table().splitlines()
    results = json.loads((ROOT / "benchmarks/results/latest.json").read_text())["results"]
    assert sum(line.startswith("| ") and line[2].isdigit() for line in step) == len(results)
    memory = json.loads((ROOT / "benchmarks/results/memory.json").read_text())["results"]
    cells = sum(line.count(" MiB |") for line in tables.memory_table().splitlines() if line[2:3].isdigit())
    assert cells == len(memory)
    loading = json.loads((ROOT / "benchmarks/results/loading.json").read_text())["runs"]
    rows = sum(line.startswith(("| float", "| bfloat")) for line in tables.loading_table().splitlines())
    assert rows == sum(len(run["peak_ratio"]) for run in loading.values())
    packing = json.loads((ROOT / "benchmarks/results/packing.json").read_text())["results"]
    rows = sum(line.startswith(("| hh |", "| imdb |")) for line in tables.packing_table().splitlines())
    assert rows == len(packing)


def test_a_stale_table_is_detected():
    (text,) = [p.read_text() for p in tables.pages() if "<!-- table: step -->" in p.read_text()]
    stale = text.replace("| 128 | DPO |", "| 128 | DPO (edited) |", 1)
    assert stale != text and tables.render(stale) != stale


@pytest.mark.parametrize("config", ["dpo", "dpo_gc", "dpo_cached", "dpo_cached_gc", "tdpo1", "mapo",
                                    "sparsepo_common", "sparsepo_indep"])
def test_the_step_benchmark_builds_and_steps_each_of_our_configurations(config, tiny_model_dir, monkeypatch):
    """``bench_dpo.py``'s own configurations on the tiny model, one optimizer step each: the benchmark keeps up with
    the module's options (a renamed option once broke every one of its rows at full depth), and its ``*_gc`` rows
    really checkpoint (the option acts in ``configure_model``, which Lightning calls and the benchmark must too)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the script runs: its sibling modules import
    spec = importlib.util.spec_from_file_location("bench_dpo", ROOT / "benchmarks" / "bench_dpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    step, batch_of, (models, _) = bench._ours(config, torch.device("cpu"), tiny_model_dir)
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in models[0].modules())
    assert wrapped == (2 if config.endswith("_gc") else 0)  # the tiny Llama's 2 blocks, checkpointed in *_gc only
    before = [p.detach().clone() for p in models[0].parameters()]
    step(batch_of([([5, 6, 7], [8, 9], [10, 11]), ([5, 6], [13, 14, 15], [16, 17, 18])]))  # rows of equal length
    assert any(not torch.equal(a, b) for a, b in zip(before, models[0].parameters(), strict=True))


def test_the_statistics_benchmark_pairs_repeats_and_times_the_hooks():
    """``bench_statistics.summarise`` on hand numbers. Step times (first interval skipped): with the statistics
    [2.0, 2.0] then [3.0, 3.0], without [2.0, 2.0] then [2.5, 2.5]; paired ratios 0 % and +20 %, median +10 %.
    Hooks: 0.2 s and 0.3 s over 2 steps -> 0.1 and 0.15 s/step, shares 0.1/2 = 5 % and 0.15/3 = 5 %."""
    spec = importlib.util.spec_from_file_location("bench_statistics", ROOT / "benchmarks" / "bench_statistics.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = {"true": [[9.0, 2.0, 2.0], [9.0, 3.0, 3.0]], "false": [[9.0, 2.0, 2.0], [9.0, 2.5, 2.5]]}
    out = bench.summarise(times, hooks=[0.2, 0.3], steps=2, skip=1)
    assert out["overhead_per_repeat"] == pytest.approx([0.0, 0.2])
    assert out["overhead"] == pytest.approx(0.1) and out["overhead_max"] == pytest.approx(0.2)
    assert out["median_seconds_per_step"] == pytest.approx({"with_statistics": 2.5, "without": 2.25})
    assert out["hook_seconds_per_step"] == pytest.approx(0.125) and out["hook_share"] == pytest.approx(0.05)


def test_the_step_benchmark_pairs_ratios_within_rounds_and_takes_medians():
    """``bench_dpo.combine`` on hand numbers, 3 rounds of ``dpo`` against its match ``trl`` (CPU seconds):
    dpo 10, 12, 20 and trl 20, 20, 25 -> paired ratios 0.5, 0.6, 0.8 (median 0.6, range 0.5-0.8). A 4th round
    where dpo failed (trl 30) is left out of dpo's medians (the ratio of the medians, 12 / 22.5 = 0.53, would mix in
    the round that has no pair); a row that failed in every round keeps its error."""
    spec = importlib.util.spec_from_file_location("bench_dpo", ROOT / "benchmarks" / "bench_dpo.py")
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(config, cpu, mem=100.0):
        return {"config": config, "length": 512, "device": "cpu", "cpu_s": cpu, "step_s": cpu / 2,
                "step_mem_mib": mem, "peak_mib": mem + 50, "dynamic_mib": mem - 10, "static_mib": {"grads_mib": 10}}

    rounds = []
    for dpo, trl in ((10.0, 20.0), (12.0, 20.0), (20.0, 25.0), (None, 30.0)):
        results = [row("trl", trl), {"config": "dpo", "length": 512, "error": "timeout"} if dpo is None
                   else row("dpo", dpo), {"config": "floor", "length": 512, "error": "oom"}]
        bench.add_ratios(results)
        rounds.append(results)
    combined = {r["config"]: r for r in bench.combine(rounds)}
    dpo, trl = combined["dpo"], combined["trl"]
    assert dpo["repeats"] == 3 and trl["repeats"] == 4
    assert dpo["time_vs_match"] == pytest.approx(0.6) and dpo["time_vs_match_range"] == pytest.approx([0.5, 0.8])
    assert dpo["time_vs_trl"] == pytest.approx(0.6)
    assert dpo["cpu_s"] == 12.0 and dpo["cpu_s_range"] == [10.0, 20.0]
    assert trl["cpu_s"] == 22.5 and trl["cpu_s_range"] == [20.0, 30.0]  # median of 20, 20, 25, 30
    assert dpo["static_mib"] == {"grads_mib": 10} and dpo["length"] == 512
    assert combined["floor"] == {"config": "floor", "length": 512, "error": "oom"}
    mixes = bench.combine([[{"config": "auto", "mix": m, "cpu_s": c} for m, c in (("hh", 1.0), ("imdb", 5.0))],
                           [{"config": "auto", "mix": m, "cpu_s": c} for m, c in (("hh", 3.0), ("imdb", 7.0))]],
                          keys=("config", "mix"))  # bench_packing.py's cells
    assert [(r["mix"], r["cpu_s"], r["cpu_s_range"]) for r in mixes] == [("hh", 2.0, [1.0, 3.0]),
                                                                        ("imdb", 6.0, [5.0, 7.0])]


def test_the_cpu_memory_benchmark_pairs_keep_and_system_within_rounds():
    """``bench_cpu_memory.summarise`` on hand numbers: dpo keep/system CPU seconds 6/8 and 9/10 in rounds 0 and 1
    (ratios 0.75 and 0.9: median 0.825, range 0.75-0.9); round 2 lost its ``keep`` cell, so it gives no ratio but its
    ``system`` cell counts in that setting's median (8, 10, 12 -> 10)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_cpu_memory", ROOT / "benchmarks" / "bench_cpu_memory.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def cell(round_index, choice, cpu):
        return {"config": "dpo", "round": round_index, "choice": choice, "cpu_s": cpu, "step_s": cpu / 2,
                "sys_s": cpu / 4, "page_faults": 1000.0 * cpu, "peak_mib": 100.0 + cpu}

    cells = [cell(0, "system", 8.0), cell(0, "keep", 6.0), cell(1, "keep", 9.0), cell(1, "system", 10.0),
             cell(2, "system", 12.0), {"config": "dpo", "round": 2, "choice": "keep", "error": "timeout"}]
    (row,) = bench.summarise(cells)
    assert row["rounds"] == 2
    assert row["cpu_keep_vs_system"] == pytest.approx(0.825)
    assert row["cpu_keep_vs_system_range"] == pytest.approx([0.75, 0.9])
    assert row["cpu_s_system"] == 10.0 and row["cpu_s_keep"] == 7.5 and row["page_faults_keep"] == 7500.0
