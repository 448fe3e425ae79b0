"""Sentiment pair builder on a tiny random Llama with a byte-level tokenizer and fake scorers (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsepo_lightning.builders import sentiment
from sparsepo_lightning.builders.continuations import SamplingConfig
from sparsepo_lightning.builders.sentiment import build_pairs, skipped_path, split_prompts
from sparsepo_lightning.data.pairing import PAIR_KEYS, SKIP_EMPTY, SKIP_IDENTICAL, SKIP_TIED, pair_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [f"The film number {i} was" for i in range(7)]
CONFIG = SamplingConfig(num_samples=3, max_new_tokens=6, batch_size=3, seed=1)


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one token per byte) with an EOS and no pad token, built locally."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_model(byte_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(byte_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def char_sum_scorer(texts: list[str]) -> list[float]:
    """Deterministic, nearly tie-free fake score."""
    return [float(sum(map(ord, text)) % 1009) for text in texts]


def constant_scorer(texts: list[str]) -> list[float]:
    return [0.5] * len(texts)


def build(model, tokenizer, out: Path, prompts=PROMPTS, **kwargs) -> sentiment.BuildReport:
    kwargs.setdefault("scorer", char_sum_scorer)
    kwargs.setdefault("config", CONFIG)
    return build_pairs(model, tokenizer, prompts, out, progress=False, **kwargs)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pair_samples_picks_highest_as_chosen_and_lowest_as_rejected():
    row, reason = pair_samples("p", [" ok", " great", " awful", " fine"], [0.1, 0.9, -0.7, 0.3])
    assert reason is None
    assert row == {"prompt": "p", "chosen": " great", "rejected": " awful", "chosen_score": 0.9, "rejected_score": -0.7}


def test_pair_samples_ignores_empty_and_breaks_ties_by_first_sample():
    row, _ = pair_samples("p", ["", " a", " b", " c", "  "], [5.0, 1.0, 1.0, 0.0, -5.0])
    assert (row["chosen"], row["rejected"]) == (" a", " c")


@pytest.mark.parametrize(
    ("texts", "scores", "reason"),
    [
        (["", " only one", "   "], [0.0, 0.3, 0.9], SKIP_EMPTY),
        ([" a", " b", " c"], [0.2, 0.2, 0.2], SKIP_TIED),
        ([" same", " same"], [0.9, 0.1], SKIP_IDENTICAL),
    ],
)
def test_pair_samples_reports_why_no_pair(texts, scores, reason):
    assert pair_samples("p", texts, scores) == (None, reason)


def test_decoding_stops_at_special_tokens_and_drops_a_cut_multibyte_character(byte_tokenizer):
    ids = byte_tokenizer(" café")["input_ids"]  # "é" is two byte tokens
    from sparsepo_lightning.generation import decode_until_special as decode

    assert decode(byte_tokenizer, ids) == " café"
    assert decode(byte_tokenizer, ids[:-1]) == " caf"  # cut inside "é"
    assert decode(byte_tokenizer, [*ids, byte_tokenizer.eos_token_id, *ids]) == " café"


def test_build_writes_one_row_per_prompt_with_chosen_above_rejected(tiny_model, byte_tokenizer, tmp_path):
    out = tmp_path / "pairs.jsonl"
    report = build(tiny_model, byte_tokenizer, out)
    rows = read_rows(out)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert all(set(row) == set(PAIR_KEYS) for row in rows)
    assert all(row["chosen_score"] > row["rejected_score"] for row in rows)
    assert all(char_sum_scorer([row["chosen"]])[0] == row["chosen_score"] for row in rows)
    assert (report.written, report.already_done, sum(report.skipped.values())) == (len(PROMPTS), 0, 0)
    assert not skipped_path(out).exists()


def test_build_is_deterministic_for_a_seed_and_leaves_global_rng_alone(tiny_model, byte_tokenizer, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    build(tiny_model, byte_tokenizer, tmp_path / "a.jsonl")
    assert torch.equal(torch.rand(1), expected_next)
    build(tiny_model, byte_tokenizer, tmp_path / "b.jsonl")
    other = SamplingConfig(num_samples=3, max_new_tokens=6, batch_size=3, seed=2)
    build(tiny_model, byte_tokenizer, tmp_path / "c.jsonl", config=other)
    a, b, c = (read_rows(tmp_path / f"{name}.jsonl") for name in "abc")
    assert a == b
    assert a != c


@pytest.mark.parametrize("kept_lines", [3, 4])  # a whole first batch, and a batch cut in the middle
def test_resume_appends_the_same_rows_as_an_uninterrupted_build(tiny_model, byte_tokenizer, tmp_path, kept_lines):
    full = tmp_path / "full.jsonl"
    build(tiny_model, byte_tokenizer, full)
    partial = tmp_path / "partial.jsonl"
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text("".join(lines[:kept_lines]), encoding="utf-8")

    report = build(tiny_model, byte_tokenizer, partial)
    assert partial.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    assert (report.already_done, report.written) == (kept_lines, len(PROMPTS) - kept_lines)


def test_resume_samples_only_batches_with_missing_prompts(tiny_model, byte_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    build(tiny_model, byte_tokenizer, out, prompts=PROMPTS[:6])
    calls = []
    real = sentiment.sample_continuations
    monkeypatch.setattr(
        sentiment, "sample_continuations", lambda *args, **kw: calls.append(kw["seed"]) or real(*args, **kw)
    )
    report = build(tiny_model, byte_tokenizer, out)
    assert calls == [CONFIG.seed + 2]  # batches 0 and 1 (prompts 0-5) were done; only batch 2 is sampled
    assert report.already_done == 6 and report.written == 1
    assert build(tiny_model, byte_tokenizer, out).written == 0  # nothing left to do
    assert len(calls) == 1


def test_skipped_prompts_are_counted_recorded_and_not_resampled(tiny_model, byte_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    report = build(tiny_model, byte_tokenizer, out, scorer=constant_scorer)
    assert report.written == 0 and report.skipped == {SKIP_TIED: len(PROMPTS)}
    assert not out.exists()
    skipped = read_rows(skipped_path(out))
    assert [row["prompt"] for row in skipped] == PROMPTS and {row["reason"] for row in skipped} == {SKIP_TIED}

    monkeypatch.setattr(sentiment, "sample_continuations", lambda *a, **k: pytest.fail("resampled a done prompt"))
    again = build(tiny_model, byte_tokenizer, out, scorer=constant_scorer)
    assert again.already_done == len(PROMPTS) and again.written == 0


def test_empty_continuations_are_counted(tiny_model, byte_tokenizer, tmp_path, monkeypatch):
    def fake_samples(model, tokenizer, prompts, config, seed):
        return [["", " x", ""] if i % 2 == 0 else [" good", " bad", " meh"] for i, _ in enumerate(prompts)]

    monkeypatch.setattr(sentiment, "sample_continuations", fake_samples)
    out = tmp_path / "pairs.jsonl"
    report = build(tiny_model, byte_tokenizer, out)
    # batches of 3: prompts 0,2 | 3,5 | 6 have even in-batch index -> 5 empty, 2 pairs
    assert report.skipped == {SKIP_EMPTY: 5} and report.written == 2
    assert [row["prompt"] for row in read_rows(out)] == [PROMPTS[1], PROMPTS[4]]


def test_refuses_to_append_to_a_file_from_another_prompt_list(tiny_model, byte_tokenizer, tmp_path):
    out = tmp_path / "pairs.jsonl"
    user_data = json.dumps({k: "x" for k in PAIR_KEYS}) + "\n"
    out.write_text(user_data, encoding="utf-8")
    with pytest.raises(ValueError, match="--overwrite"):
        build(tiny_model, byte_tokenizer, out)
    assert out.read_text(encoding="utf-8") == user_data

    out.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        build(tiny_model, byte_tokenizer, out)

    report = build(tiny_model, byte_tokenizer, out, overwrite=True)
    assert report.written == len(PROMPTS) and len(read_rows(out)) == len(PROMPTS)


def test_rejects_duplicate_prompts_and_bad_settings(tiny_model, byte_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="duplicated"):
        build(tiny_model, byte_tokenizer, tmp_path / "x.jsonl", prompts=["a b", "a b"])
    with pytest.raises(ValueError, match="num_samples"):
        SamplingConfig(num_samples=1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"SamplingConfig.temperature=0 is invalid: it must be > 0"):
        SamplingConfig(temperature=0)  # greedy decoding would give identical continuations
    assert (SamplingConfig().max_new_tokens, SamplingConfig().batch_size) == (24, 32)


def test_split_prompts_is_deterministic_disjoint_and_order_preserving():
    prompts = [f"p{i}" for i in range(20)]
    train, val = split_prompts(prompts, val_size=5, seed=3)
    assert (train, val) == split_prompts(prompts, val_size=5, seed=3)
    assert len(val) == 5 and sorted(train + val) == sorted(prompts)
    assert train == [p for p in prompts if p in train]
    with pytest.raises(ValueError, match="--val-size"):
        split_prompts(prompts, val_size=20)


def test_cli_builds_a_split_from_a_local_checkpoint(tiny_model, byte_tokenizer, tmp_path):
    checkpoint = tmp_path / "tiny"
    tiny_model.save_pretrained(checkpoint)
    byte_tokenizer.save_pretrained(checkpoint)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    common = ["--model", str(checkpoint), "--prompts", str(prompts_file), "--val-size", "2", "--num-samples", "2"]
    common += ["--max-new-tokens", "4", "--no-progress"]
    train = sentiment.main([*common, "--split", "train", "--out", str(tmp_path / "train.jsonl")])
    val = sentiment.main([*common, "--split", "val", "--out", str(tmp_path / "val.jsonl")])
    assert train.prompts == 5 and val.prompts == 2
    # VADER scores random bytes as neutral, so most prompts end up in the sidecar: collect both files.
    train_prompts, val_prompts = (prompts_in(tmp_path / name) for name in ("train.jsonl", "val.jsonl"))
    assert len(train_prompts) == 5 and len(val_prompts) == 2 and not train_prompts & val_prompts


def prompts_in(out: Path) -> set[str]:
    files = [path for path in (out, skipped_path(out)) if path.exists()]
    return {row["prompt"] for path in files for row in read_rows(path)}
