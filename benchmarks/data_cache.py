"""Seconds to the first batch with and without the tokenised-split cache (``data.cache_tokenised``).

Builds N synthetic preference pairs (default 20,000) from the words of ``data/quickstart/train.jsonl``: seeded
random prompts of 10-120 words and responses of 5-80 words (word counts uniform), written as one JSONL file. Each
start runs in a fresh process, as the CLI does: ``check_sources("fit")``, ``setup("fit")`` and the first training
batch of a ``PreferenceDataModule`` (SmolLM2-135M's tokenizer, ``max_length`` 512, ``max_prompt_length`` 256,
batch size 4). The timer starts after the imports and covers loading the tokenizer.

- ``uncached``: ``cache_tokenised: false``, what every start cost before the cache;
- ``cold``: an empty cache folder: read, validate, tokenise, then write the Arrow files;
- ``warm``: the same again: the cache is read back (the ratio ``warm / cold`` is the point);
- ``cold_num_proc``: an empty cache folder, tokenised by ``--num-proc`` worker processes (``datasets.map``).

Run: ``python benchmarks/data_cache.py`` (``--pairs`` for another N, ``--tokenizer`` for another model); writes
``benchmarks/results/data_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_VARIABLE = "SPARSEPO_TOKENISED_CACHE"


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs of random word sequences drawn from the quickstart data's vocabulary."""
    words = []
    for line in (ROOT / "data" / "quickstart" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        words += f"{row['prompt']} {row['chosen']} {row['rejected']}".split()
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    return [{"prompt": text(10, 120), "chosen": " " + text(5, 80), "rejected": " " + text(5, 80)}
            for _ in range(n)]


def start(train_file: str, tokenizer: str, cache_tokenised: bool, num_proc: int | None) -> dict[str, float]:
    """One start in this process: seconds to ``check_sources``, ``setup`` and the first batch (cumulative)."""
    from sparsepo_lightning.data import PreferenceDataModule

    t0 = time.perf_counter()
    dm = PreferenceDataModule(tokenizer=tokenizer, train_file=train_file, max_length=512, max_prompt_length=256,
                              batch_size=4, cache_tokenised=cache_tokenised, num_proc=num_proc)
    dm.check_sources("fit")
    checked = time.perf_counter()
    dm.setup("fit")
    set_up = time.perf_counter()
    next(iter(dm.train_dataloader()))
    first = time.perf_counter()
    return {"check_sources_s": checked - t0, "setup_s": set_up - t0, "first_batch_s": first - t0,
            "pairs": len(dm.datasets["train"])}


def run(name: str, train_file: Path, tokenizer: str, cache: Path, cache_tokenised: bool = True,
        num_proc: int | None = None) -> dict[str, float]:
    """One start in a fresh process (``--child``); prints and returns its timings."""
    command = [sys.executable, __file__, "--child", "--train-file", str(train_file), "--tokenizer", tokenizer,
               "--cache-tokenised", str(int(cache_tokenised))] + (["--num-proc", str(num_proc)] if num_proc else [])
    began = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ, **{CACHE_VARIABLE: str(cache)}), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - began
    print(f"{name:<16}{result['check_sources_s']:>10.2f}{result['setup_s']:>10.2f}{result['first_batch_s']:>13.2f}"
          f"{result['process_s']:>11.2f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--num-proc", type=int, default=2, help="workers of the cold_num_proc start (0: skip it)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_cache.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--cache-tokenised", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(start(args.train_file, args.tokenizer, bool(args.cache_tokenised), args.num_proc or None)))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sparsepo-bench-data-") as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(row) + "\n" for row in synthetic_pairs(args.pairs)))
        print(f"{args.pairs} synthetic pairs, {train_file.stat().st_size / 2**20:.1f} MiB; cumulative seconds:")
        print(f"{'start':<16}{'checked':>10}{'set up':>10}{'first batch':>13}{'process':>11}")
        runs = {"uncached": run("uncached", train_file, args.tokenizer, Path(tmp) / "unused", cache_tokenised=False),
                "cold": run("cold", train_file, args.tokenizer, Path(tmp) / "cache"),
                "warm": run("warm", train_file, args.tokenizer, Path(tmp) / "cache")}
        cache_bytes = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*") if f.is_file())
        if args.num_proc:
            runs["cold_num_proc"] = run("cold_num_proc", train_file, args.tokenizer, Path(tmp) / "cache2",
                                        num_proc=args.num_proc)
    ratio = runs["warm"]["first_batch_s"] / runs["cold"]["first_batch_s"]
    print(f"warm / cold (first batch): {ratio:.3f}; cache {cache_bytes / 2**20:.1f} MiB")
    import datasets
    import tokenizers
    import transformers

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__, "pairs": args.pairs,
            "tokenizer": args.tokenizer, "num_proc": args.num_proc, "max_length": 512, "max_prompt_length": 256,
            "lengths": "words per prompt uniform in [10, 120], per response in [5, 80]"}
    result = {"meta": meta, "runs": runs, "warm_over_cold": ratio, "cache_mib": cache_bytes / 2**20}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
