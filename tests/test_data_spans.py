"""Data pipeline, per-token weights from character spans: validation, token alignment, truncation, chat
templates, collate and the data module end to end."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import ByT5Tokenizer

from sparsepo_lightning.data import PreferenceDataModule, PreferencePair, collate_pairs, load_pairs, tokenize_pair
from sparsepo_lightning.data.tokenize import SpanError
from sparsepo_lightning.errors import ConfigError, DataError
from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch

SIDES = ("chosen", "rejected")


def _write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _char_ranges(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Independent of offsets mapping: each token's characters in the decoded text of ``ids[1:]`` (after BOS),
    from the lengths of decoded prefixes (ASCII text only); ``(0, 0)`` for BOS and EOS."""
    ranges = [(0, 0)]
    for k in range(1, len(ids)):
        if ids[k] == tokenizer.eos_token_id:
            ranges.append((0, 0))
            continue
        ranges.append((len(tokenizer.decode(ids[1:k])), len(tokenizer.decode(ids[1 : k + 1]))))
    return ranges


def _expected(tokenizer, features: dict, side: str, response_start: int, spans) -> tuple[list[float], list[int]]:
    """Naive per-token loop: the largest weight of the spans (moved by ``response_start``) a response token meets."""
    ids, labels = features[f"{side}_input_ids"], features[f"{side}_labels"]
    weights, covered = [], []
    for (a, b), label in zip(_char_ranges(tokenizer, ids), labels, strict=True):
        hits = [w for s, e, w in spans if label != IGNORE_INDEX and a < response_start + e and response_start + s < b]
        weights.append(max(hits) if hits else 0.0)
        covered.append(int(bool(hits)))
    return weights, covered


def _covered_text(tokenizer, features: dict, side: str) -> list[str]:
    """The decoded covered tokens, one string per run of consecutive covered tokens."""
    runs, current = [], []
    for token, flag in zip(features[f"{side}_input_ids"], features[f"{side}_span_covered"], strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


# --------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------


def test_plain_text_spans_weight_exactly_the_tokens_they_intersect(tiny_tokenizer):
    chosen, rejected = " great and the actors were wonderful.", " terrible; I left early."
    chosen_spans = ((1, 6, 2.0), (27, 36, 0.5))  # "great", "wonderful"
    rejected_spans = ((1, 9, -1.5),)  # "terrible"
    assert chosen[1:6] == "great" and chosen[27:36] == "wonderful" and rejected[1:9] == "terrible"
    pair = PreferencePair("The movie was", chosen, rejected, chosen_spans=chosen_spans, rejected_spans=rejected_spans)
    features = tokenize_pair(pair, tiny_tokenizer, max_length=128, max_prompt_length=64)
    plain = tokenize_pair(PreferencePair("The movie was", chosen, rejected), tiny_tokenizer, 128, 64)
    assert {k: features[k] for k in plain} == plain  # ids, labels, counters unchanged by spans
    for side, spans in (("chosen", chosen_spans), ("rejected", rejected_spans)):
        weights, covered = _expected(tiny_tokenizer, features, side, len(pair.prompt), spans)
        assert features[f"{side}_span_weights"] == weights and features[f"{side}_span_covered"] == covered
        assert len(weights) == len(features[f"{side}_input_ids"])
    # by hand: the covered tokens spell the words (a byte-level token keeps its leading space)
    assert _covered_text(tiny_tokenizer, features, "chosen") == ["great", " wonderful"]
    assert _covered_text(tiny_tokenizer, features, "rejected") == [" terrible"]
    assert sorted(set(features["chosen_span_weights"])) == [0.0, 0.5, 2.0]
    ids, weights = features["chosen_input_ids"], features["chosen_span_weights"]
    assert [w for t, w in zip(ids, weights, strict=True) if t != tiny_tokenizer.bos_token_id][-1] == 0.0  # EOS
    n_prompt = features["chosen_labels"].count(IGNORE_INDEX)
    assert weights[:n_prompt] == [0.0] * n_prompt and ids[0] == tiny_tokenizer.bos_token_id


def test_token_meeting_two_spans_takes_the_largest_weight_and_touching_is_not_intersecting(tiny_tokenizer):
    prompt, response = "The movie was", " great movie"
    features = tokenize_pair(PreferencePair(prompt, response, " bad"), tiny_tokenizer, 64, 32)
    n_prompt = features["chosen_labels"].count(IGNORE_INDEX)
    pieces = [tiny_tokenizer.decode([t]) for t in features["chosen_input_ids"][n_prompt:-1]]
    assert "".join(pieces) == response
    k = next(i for i, piece in enumerate(pieces) if len(piece) >= 2)  # a token of several characters
    a = sum(len(piece) for piece in pieces[:k])
    b = a + len(pieces[k])
    spans = ((a, a + 1, 1.0), (a + 1, b, 3.0))  # both inside token k; touching tokens k - 1 and k + 1 only
    pair = PreferencePair(prompt, response, " bad", chosen_spans=spans)
    out = tokenize_pair(pair, tiny_tokenizer, 64, 32)
    position = n_prompt + k
    assert out["chosen_span_weights"][position] == 3.0
    assert out["chosen_span_covered"] == [int(i == position) for i in range(len(out["chosen_input_ids"]))]
    assert out["chosen_span_weights"] == _expected(tiny_tokenizer, features, "chosen", len(prompt), spans)[0]


def test_pair_without_spans_has_no_span_keys_and_one_side_only_has_its_own(tiny_tokenizer):
    plain = tokenize_pair(PreferencePair("hello", " world", " there"), tiny_tokenizer, 64, 32)
    assert not any("span" in key for key in plain)
    one_side = tokenize_pair(PreferencePair("hello", " world", " there", rejected_spans=((1, 3, 1.0),)),
                             tiny_tokenizer, 64, 32)
    assert "rejected_span_weights" in one_side and "chosen_span_weights" not in one_side
    empty = tokenize_pair(PreferencePair("hello", " world", " there", chosen_spans=()), tiny_tokenizer, 64, 32)
    assert empty["chosen_span_covered"] == [0] * len(empty["chosen_input_ids"])


def test_truncation_cuts_weights_exactly_like_the_ids(tiny_tokenizer):
    prompt = "The movie was great and the actors were wonderful. " * 3
    chosen = " hello there, how are you? hello world"
    pair = PreferencePair(prompt, chosen, " Great.", chosen_spans=((1, 6, 1.0), (7, 12, 2.0), (33, 38, 4.0)),
                          rejected_spans=((1, 6, 0.5),))
    full = tokenize_pair(pair, tiny_tokenizer, max_length=1000, max_prompt_length=999)
    n_prompt = full["chosen_labels"].count(IGNORE_INDEX)
    max_prompt_length, budget = 10, 5
    cut = tokenize_pair(pair, tiny_tokenizer, max_length=max_prompt_length + budget, max_prompt_length=10)
    assert cut["prompt_truncated"] == 1 and cut["response_truncated"] == 1
    for side in SIDES:
        n_response = len(full[f"{side}_input_ids"]) - n_prompt
        kept = min(budget, n_response)
        assert cut[f"{side}_input_ids"][max_prompt_length:] == full[f"{side}_input_ids"][n_prompt : n_prompt + kept]
        for key in (f"{side}_span_weights", f"{side}_span_covered"):
            assert len(cut[key]) == len(cut[f"{side}_input_ids"])
            assert cut[key] == [0] * max_prompt_length + full[key][n_prompt : n_prompt + kept]
    assert 2.0 in cut["chosen_span_weights"] and 4.0 not in cut["chosen_span_weights"]  # "world" was cut off
    assert 4.0 in full["chosen_span_weights"]


def test_chat_template_spans_map_into_the_message_content(tiny_tokenizer):
    prompt = [{"role": "user", "content": "How was the movie?"}]
    pair = PreferencePair(prompt, [{"role": "assistant", "content": "It was great."}], "It was bad.",
                          chosen_spans=((7, 12, 2.0),), rejected_spans=((0, 2, 1.0), (7, 10, 3.0)))
    features = tokenize_pair(pair, tiny_tokenizer, max_length=128, max_prompt_length=64)
    assert _covered_text(tiny_tokenizer, features, "chosen") == ["great"]  # " " is a token of its own here
    assert _covered_text(tiny_tokenizer, features, "rejected") == ["It", " bad"]
    text = tiny_tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "It was bad."}],
                                              tokenize=False)
    start = text.index("It was bad.")
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    labels = features["rejected_labels"]
    expected = [max([w for s, e, w in pair.rejected_spans if a < start + e and start + s < b and label != -100],
                    default=0.0) for (a, b), label in zip(offsets, labels, strict=True)]
    assert features["rejected_span_weights"] == expected
    assert features["rejected_input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert features["rejected_span_weights"][-2:] == [0.0, 0.0]  # "." and the template's EOS

    plain = PreferencePair("How was the movie?", "great", "bad", chosen_spans=((0, 5, 1.0),))
    chat = tokenize_pair(plain, tiny_tokenizer, 128, 64, use_chat_template=True)
    assert _covered_text(tiny_tokenizer, chat, "chosen") == ["great"]


def test_chat_template_that_trims_is_followed_and_one_that_rewrites_raises(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("m['content']", "m['content'] | trim")
    pair = PreferencePair([{"role": "user", "content": "hi"}], "  great movie ", " bad",
                          chosen_spans=((0, 3, 5.0), (8, 13, 1.0)), source="f.jsonl:4")
    features = tokenize_pair(pair, tokenizer, 64, 32)
    assert _covered_text(tokenizer, features, "chosen") == ["gre", " movie"]  # span 0 clipped to "g"
    assert tokenizer.decode(features["chosen_input_ids"]).endswith("great movie</s>")

    tokenizer.chat_template = tokenizer.chat_template.replace("| trim", "| upper")
    with pytest.raises(SpanError, match=r"f\.jsonl:4: the chosen response's text does not appear.*Fix:"):
        tokenize_pair(pair, tokenizer, 64, 32)


def test_slow_tokenizer_with_spans_raises_naming_the_fix():
    slow = ByT5Tokenizer()
    assert not slow.is_fast
    assert "chosen_span_weights" not in tokenize_pair(PreferencePair("a", "b", "c"), slow, 16, 8)
    with pytest.raises(ConfigError, match=r"x\.jsonl:2: .*slow.*Fix: load the tokenizer with use_fast=True"):
        tokenize_pair(PreferencePair("a", "bc", "c", chosen_spans=((0, 1, 1.0),), source="x.jsonl:2"), slow, 16, 8)


def test_unvalidated_bad_spans_raise_instead_of_misweighting(tiny_tokenizer):
    pair = PreferencePair("a", " bc", " d", chosen_spans=((0, 2, 1.0), (1, 3, 2.0)), source="code")
    with pytest.raises(SpanError, match="code: chosen_spans .*overlapping.*load_pairs"):
        tokenize_pair(pair, tiny_tokenizer, 16, 8)


_WORDS = ["hello", "world", "the", "movie", "was", "great", "and", "actors", "wonderful", "terrible", ";", "?"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(_WORDS), min_size=1, max_size=8), cuts=st.lists(st.integers(0, 60)),
       weights=st.lists(st.floats(-3, 3), min_size=30, max_size=30))
def test_fuzz_weights_match_a_naive_loop(tiny_tokenizer, words, cuts, weights):
    response = " " + " ".join(words)
    points = sorted({c for c in cuts if c <= len(response)})
    spans = tuple((s, e, weights[i % 30]) for i, (s, e) in enumerate(zip(points, points[1:], strict=False))
                  if i % 2 == 0)
    pair = PreferencePair("The movie was", response, " bad", chosen_spans=spans)
    features = tokenize_pair(pair, tiny_tokenizer, 64, 32)
    expected = _expected(tiny_tokenizer, features, "chosen", len(pair.prompt), spans)
    assert (features["chosen_span_weights"], features["chosen_span_covered"]) == expected


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def test_valid_spans_are_read_as_tuples_and_absent_or_null_columns_as_none(tmp_path):
    rows = [
        {"prompt": "p", "chosen": " good film", "rejected": " bad", "chosen_spans": [[1, 5, 1], [6, 10.0, 0.5]]},
        {"prompt": "p", "chosen": " good", "rejected": " bad", "rejected_spans": None},
        {"prompt": "p", "chosen": " good", "rejected": " bad", "rejected_spans": []},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": "no", "chosen_spans": [[0, 3, 2]], "rejected_spans": [[0, 2, 1]]},
    ]
    pairs, report = load_pairs(_write_jsonl(tmp_path / "s.jsonl", rows))
    assert report.rows_rejected == 0
    assert pairs[0].chosen_spans == ((1, 5, 1.0), (6, 10, 0.5)) and pairs[0].rejected_spans is None
    assert all(isinstance(v, int) for v in pairs[0].chosen_spans[1][:2])
    assert pairs[1].chosen_spans is None and pairs[1].rejected_spans is None
    assert pairs[2].rejected_spans == ()
    assert pairs[3].chosen_spans == ((0, 3, 2.0),) and pairs[3].rejected_spans == ((0, 2, 1.0),)


BAD_SPANS = [
    ([[0, 4, 1.0], [3, 6, 1.0]], r"span 1 \[3, 6, 1\.0\] starts at 3, before span 0 ends at 4.*Fix: sort the spans"),
    ([[4, 6, 1.0], [0, 2, 1.0]], r"span 1 \[0, 2, 1\.0\] starts at 0, before span 0 ends at 6"),
    ([[0, 99, 1.0]], r"span 0 \[0, 99, 1\.0\] is out of range: the 'chosen' text has 10 characters.*Fix: count"),
    ([[-1, 2, 1.0]], r"span 0 \[-1, 2, 1\.0\] is out of range"),
    ([[3, 3, 1.0]], r"span 0 \[3, 3, 1\.0\] is out of range"),
    ([[0, 2, math.nan]], r"span 0 .*the weight must be a finite number, got nan.*Fix: give every span"),
    ([[0, 2, math.inf]], r"span 0 .*the weight must be a finite number, got inf"),
    ([[0, 2, True]], r"span 0 .*the weight must be a finite number, got True"),
    ([[0, 2, "1"]], r"span 0 .*the weight must be a finite number, got '1'"),
    ([[0.5, 2, 1.0]], r"span 0 \[0\.5, 2, 1\.0\]: start and end must be whole numbers"),
    ([[0, 2]], r"span 0 is '\[0, 2\]', not a \[start, end, weight\] list"),
    ({"0": [0, 2, 1]}, r"expected a list of spans, got dict"),
]


@pytest.mark.parametrize(("spans", "message"), BAD_SPANS, ids=[m[:30] for _, m in BAD_SPANS])
def test_bad_spans_are_counted_with_location_field_and_fix(tmp_path, spans, message):
    rows = [{"prompt": "p", "chosen": " good film", "rejected": " bad"},
            {"prompt": "p", "chosen": " good film", "rejected": " bad", "chosen_spans": spans}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json writes NaN / Infinity literals
    pairs, report = load_pairs(path)
    assert len(pairs) == 1 and report.counts == {"bad_spans": 1}
    issue = report.first["bad_spans"]
    assert issue.location == f"{path}:2" and issue.field == "chosen_spans"
    assert issue.message.startswith(f"{path}:2 field 'chosen_spans': ")
    assert "bad_spans" in report.summary() and f"{path}:2" in report.summary()
    with pytest.raises(DataError, match=rf"bad\.jsonl:2 field 'chosen_spans': {message}"):
        load_pairs(path, strict=True)


def test_spans_on_a_response_of_several_messages_are_rejected(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
             "chosen_spans": [[0, 1, 1.0]]},
            {"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    _, report = load_pairs(path)
    assert report.counts == {"bad_spans": 1}
    message = report.first["bad_spans"].message
    assert message.startswith(f"{path}:1 field 'chosen_spans': spans need a plain-text response or exactly one")
    assert "'chosen' has 2 messages" in message and "Fix: store 'chosen' as one string or one message" in message


def test_span_column_names_are_configurable(tmp_path):
    rows = [{"prompt": "p", "good": " yes", "bad": " no", "good_w": [[1, 4, 2.0]], "chosen_spans": "ignored"}]
    pairs, _ = load_pairs(_write_jsonl(tmp_path / "c.jsonl", rows), chosen_field="good", rejected_field="bad",
                          chosen_spans_field="good_w", rejected_spans_field="bad_w")
    assert pairs[0].chosen_spans == ((1, 4, 2.0),) and pairs[0].rejected_spans is None


# --------------------------------------------------------------------------------------------------------
# Collate and the data module
# --------------------------------------------------------------------------------------------------------


def test_mixed_batch_collates_zero_weights_for_rows_without_spans(tiny_tokenizer):
    pairs = [PreferencePair("The movie was", " great", " bad", chosen_spans=((1, 6, 2.0),)),
             PreferencePair("hello", " world", " there"),
             PreferencePair("hello", " world", " there, how are you?", rejected_spans=((1, 6, 0.5), (16, 19, 1.0)))]
    features = [tokenize_pair(p, tiny_tokenizer, 64, 32) for p in pairs]
    batch = collate_pairs(features, pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch.token_weights.shape == batch.token_weighted.shape == batch.input_ids.shape
    assert batch.input_ids.shape[0] == 6
    assert batch.token_weights.dtype == torch.float32 and batch.token_weighted.dtype == torch.bool
    for row in range(6):
        side, feature = SIDES[row // 3], features[row % 3]
        length = int(batch.attention_mask[row].sum())
        weights, covered = batch.token_weights[row], batch.token_weighted[row]
        assert not weights[length:].any() and not covered[length:].any()  # padding
        if f"{side}_span_weights" in feature:
            assert weights[:length].tolist() == feature[f"{side}_span_weights"]
            assert covered[:length].tolist() == [bool(c) for c in feature[f"{side}_span_covered"]]
        else:
            assert not weights.any() and not covered.any()
    assert batch.token_weighted[0].any() and batch.token_weighted[5].any()
    assert not batch.token_weighted[[1, 2, 3, 4]].any()
    assert torch.equal(batch.token_weighted, batch.token_weights != 0)  # no zero weight in these spans

    weights, weighted = batch.shifted_token_weights()
    labels, response_mask = batch.shifted_labels()
    assert weights.shape == labels.shape and torch.equal(weights, batch.token_weights[:, 1:])
    assert not weighted[~response_mask].any()  # prompt and padding are never weighted
    assert torch.equal(weighted, batch.token_weighted[:, 1:])


def test_batch_without_spans_has_none_and_bad_feature_lengths_raise(tiny_tokenizer):
    features = [tokenize_pair(PreferencePair("hello", " world", " there"), tiny_tokenizer, 64, 32)]
    batch = collate_pairs(features, pad_token_id=0)
    assert batch.token_weights is None and batch.token_weighted is None
    assert batch.shifted_token_weights() == (None, None)
    bad = dict(features[0], chosen_span_weights=[1.0], chosen_span_covered=[1])
    with pytest.raises(ValueError, match="chosen_span_weights/chosen_span_covered of a row differ in length"):
        collate_pairs([bad], pad_token_id=0)


def test_datamodule_end_to_end_batches_carry_token_weights_and_count_bad_spans(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "The movie was", "chosen": " great", "rejected": " bad", "chosen_spans": [[1, 6, 2.0]]},
        {"prompt": "hello", "chosen": " world", "rejected": " there"},
        {"prompt": "hello", "chosen": " world", "rejected": " there", "rejected_spans": [[0, 9, 1.0]]},
        {"prompt": "hello", "chosen": " there", "rejected": " world", "rejected_spans": [[1, 6, 0.5]]},
    ]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    dm = PreferenceDataModule(train_file=path, max_length=64, max_prompt_length=32, batch_size=3, seed=0)
    dm.tokenizer = tiny_tokenizer
    with pytest.warns(UserWarning, match="rejected 1 x bad_spans"):
        dm.setup("fit")
    report = dm.report["train"]
    assert report.rows_kept == 3 and report.counts == {"bad_spans": 1}
    assert report.first["bad_spans"].location == f"{path}:3"
    assert [dm.sources["train"][i].rsplit(":", 1)[1] for i in range(3)] == ["1", "2", "4"]
    batches = list(dm.train_dataloader())
    assert [b.input_ids.shape[0] for b in batches] == [6]
    batch = batches[0]
    assert isinstance(batch, PreferenceBatch) and batch.token_weights is not None
    assert batch.token_weights.shape == batch.input_ids.shape
    lines = [source.rsplit(":", 1)[1] for source in dm.train_batch_sources(0)]
    values = {(SIDES[r // 3], lines[r % 3]): sorted(set(batch.token_weights[r].tolist())) for r in range(6)}
    assert values.pop(("chosen", "1")) == [0.0, 2.0] and values.pop(("rejected", "4")) == [0.0, 0.5]
    assert list(values.values()) == [[0.0]] * 4
    assert torch.equal(batch.token_weighted, batch.token_weights != 0)


def test_datamodule_counts_spans_the_chat_template_hides_and_uses_custom_columns(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "q", "good": "yes", "bad": "no", "good_w": [[0, 3, 1.0]]},
            {"prompt": "q", "good": "fine", "bad": "no"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    upper = tiny_tokenizer.chat_template.replace("m['content']", "m['content'] | upper")
    dm = PreferenceDataModule(train_file=path, chosen_field="good", rejected_field="bad", chosen_spans_field="good_w",
                              use_chat_template=True, chat_template=upper, max_length=64, max_prompt_length=32)
    dm.tokenizer = copy.deepcopy(tiny_tokenizer)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        dm.setup("fit")
    assert dm.report["train"].counts == {"bad_spans": 1}
    assert dm.report["train"].first["bad_spans"].message.startswith(f"{path}:1: the chosen response's text")
    strict = PreferenceDataModule(train_file=path, chosen_field="good", rejected_field="bad",
                                  chosen_spans_field="good_w", use_chat_template=True, chat_template=upper,
                                  max_length=64, max_prompt_length=32, strict=True)
    strict.tokenizer = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(SpanError, match=rf"{path}:1"):
        strict.setup("fit")


def test_docs_span_example_reads_and_weights_its_words(tiny_tokenizer, tmp_path):
    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    (row,) = [block for block in re.findall(r"```json\n(.*?)```", page, flags=re.S) if "chosen_spans" in block]
    path = tmp_path / "docs.jsonl"
    path.write_text(row)
    pairs, report = load_pairs(path)
    assert report.rows_rejected == 0 and pairs[0].chosen_spans == ((1, 6, 2.0), (14, 19, 1.0))
    features = tokenize_pair(pairs[0], tiny_tokenizer, 64, 32)
    assert [run.strip() for run in _covered_text(tiny_tokenizer, features, "chosen")] == ["great", "great"]
    assert [run.strip() for run in _covered_text(tiny_tokenizer, features, "rejected")] == ["dull"]
