"""The shipped quickstart data is what data/quickstart/README.md says: its prompts, split, counts and row format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from sparsepo_lightning.builders.sentiment import split_prompts

DATA = Path(__file__).resolve().parents[1] / "data" / "quickstart"


def _rows(name: str) -> list[dict]:
    path = DATA / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_prompts_file_is_what_make_prompts_writes():
    spec = importlib.util.spec_from_file_location("make_prompts", DATA / "make_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = (DATA / "prompts.txt").read_text().splitlines()
    assert written == module.prompts() and len(written) == len(set(written)) == 576


def test_every_prompt_of_each_split_gave_a_pair_or_a_recorded_skip():
    prompts = (DATA / "prompts.txt").read_text().splitlines()
    train, val = split_prompts(prompts, 64, seed=0)
    for split, expected in (("train", train), ("val", val)):
        pairs, skipped = _rows(f"{split}.jsonl"), _rows(f"{split}.skipped.jsonl")
        seen = [r["prompt"] for r in pairs] + [r["prompt"] for r in skipped]
        assert sorted(seen) == sorted(expected), split
        assert len(pairs) >= 0.9 * len(expected)


def test_rows_have_the_documented_format():
    for split in ("train", "val"):
        for row in _rows(f"{split}.jsonl"):
            assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
            assert row["chosen_score"] > row["rejected_score"]
            assert -1.0 <= row["rejected_score"] < row["chosen_score"] <= 1.0
            assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
