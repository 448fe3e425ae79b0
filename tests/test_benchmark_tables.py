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
