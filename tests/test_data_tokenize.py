"""Data pipeline, tokenisation: labels, BOS/EOS, chat templates, truncation, and collate into (2B, T) batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsepo_lightning.data import (
    PreferencePair,
    collate_pairs,
    tokenize_pair,
)
from sparsepo_lightning.data.tokenize import EmptyResponseError
from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch
from tests.conftest import token_ids as _ids


def _response_part(features: dict, side: str) -> list[int]:
    return [t for t in features[f"{side}_labels"] if t != IGNORE_INDEX]


# --------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------


def _naive_plain(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Reference: [BOS] + ids(prompt + response) + [EOS]; labels from the token-prefix boundary, by loop."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt_ids = [bos] + _ids(tokenizer, prompt)
    full_ids = [bos] + _ids(tokenizer, prompt + response) + [eos]
    boundary = 0
    while boundary < len(prompt_ids) and prompt_ids[boundary] == full_ids[boundary]:
        boundary += 1
    labels = [IGNORE_INDEX if i < boundary else t for i, t in enumerate(full_ids)]
    return full_ids, labels


def test_plain_text_labels_match_naive_recomputation(tiny_tokenizer):
    pair = PreferencePair("The movie was", " great and the actors were wonderful.", " terrible; I left early.")
    features = tokenize_pair(pair, tiny_tokenizer, max_length=128, max_prompt_length=64)
    for side in ("chosen", "rejected"):
        ids, labels = _naive_plain(tiny_tokenizer, pair.prompt, getattr(pair, side))
        assert features[f"{side}_input_ids"] == ids
        assert features[f"{side}_labels"] == labels
        n_prompt = 1 + len(_ids(tiny_tokenizer, pair.prompt))  # this prompt ends on a word: no merge
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert features["prompt_truncated"] == 0 and features["response_truncated"] == 0


def test_prompt_boundary_comes_from_token_prefix_when_tokens_merge(tiny_tokenizer):
    pair = PreferencePair("hel", "lo world", "lo there")
    prompt_ids, full_ids = _ids(tiny_tokenizer, "hel"), _ids(tiny_tokenizer, "hello world")
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the tokenizer merges across the boundary
    features = tokenize_pair(pair, tiny_tokenizer, max_length=64, max_prompt_length=32)
    ids, labels = _naive_plain(tiny_tokenizer, "hel", "lo world")
    assert features["chosen_input_ids"] == ids and features["chosen_labels"] == labels
    response = _response_part(features, "chosen")
    assert tiny_tokenizer.decode(response, skip_special_tokens=True).endswith("lo world")
    assert features["chosen_labels"][0] == IGNORE_INDEX  # only the BOS is prompt here


def test_chat_template_that_writes_bos_gives_a_single_bos_and_one_eos(tiny_tokenizer):
    pair = PreferencePair([{"role": "user", "content": "How was the movie?"}], "It was great.", "It was bad.")
    features = tokenize_pair(pair, tiny_tokenizer, max_length=128, max_prompt_length=64)
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    text = tiny_tokenizer.apply_chat_template(
        [*pair.prompt, {"role": "assistant", "content": "It was great."}], tokenize=False
    )
    assert text.startswith("<s><|user|>") and text.endswith("It was great.</s>")
    ids = features["chosen_input_ids"]
    assert ids == _ids(tiny_tokenizer, text)  # BOS from the text, EOS from the template: nothing added
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids[-1] == eos and ids[-2] != eos
    prompt_text = tiny_tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    n_prompt = len(_ids(tiny_tokenizer, prompt_text))
    assert features["chosen_labels"] == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    assert tiny_tokenizer.decode(ids[n_prompt:]) == "It was great.</s>"


def test_use_chat_template_wraps_plain_strings_in_messages(tiny_tokenizer):
    pair = PreferencePair("How was the movie?", "great", "bad")
    chat = tokenize_pair(pair, tiny_tokenizer, max_length=128, max_prompt_length=64, use_chat_template=True)
    text = tiny_tokenizer.decode(chat["chosen_input_ids"])
    assert text == "<s><|user|>\nHow was the movie?</s><|assistant|>\ngreat</s>"


def test_eos_is_appended_once_and_not_doubled(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    features = tokenize_pair(PreferencePair("hello", " world", " there</s>"), tiny_tokenizer, 64, 32)
    assert features["chosen_input_ids"][-1] == eos and features["chosen_input_ids"].count(eos) == 1
    assert features["rejected_input_ids"][-1] == eos and features["rejected_input_ids"].count(eos) == 1


def test_gpt2_style_tokenizer_adds_no_bos_but_appends_eos(gpt2_style_tokenizer):
    tokenizer = gpt2_style_tokenizer
    features = tokenize_pair(PreferencePair("hello", " world", " there"), tokenizer, 64, 32)
    eos = tokenizer.eos_token_id
    assert features["chosen_input_ids"] == _ids(tokenizer, "hello world") + [eos]
    n_prompt = len(_ids(tokenizer, "hello"))
    assert features["chosen_labels"] == [IGNORE_INDEX] * n_prompt + features["chosen_input_ids"][n_prompt:]


def test_chat_pair_without_template_raises_with_fix(gpt2_style_tokenizer):
    pair = PreferencePair([{"role": "user", "content": "hi"}], "a", "b", source="f.jsonl:3")
    with pytest.raises(ValueError, match=r"f\.jsonl:3: .*no chat_template.*Fix:"):
        tokenize_pair(pair, gpt2_style_tokenizer, 64, 32)


def test_truncation_keeps_bos_and_prompt_end_then_cuts_responses_exactly(tiny_tokenizer):
    prompt = "The movie was great and the actors were wonderful. " * 3
    pair = PreferencePair(prompt, "hello there, how are you? hello world", "Great.")
    full = tokenize_pair(pair, tiny_tokenizer, max_length=1000, max_prompt_length=999)
    n_prompt = full["chosen_labels"].count(IGNORE_INDEX)
    prompt_ids = full["chosen_input_ids"][:n_prompt]
    chosen, rejected = _response_part(full, "chosen"), _response_part(full, "rejected")
    assert n_prompt > 20 and len(chosen) > 8 and len(rejected) < 8

    max_prompt_length, budget = 10, len(rejected) + 1  # prompt cut to 10 (BOS + last 9), chosen cut to budget
    max_length = max_prompt_length + budget
    cut = tokenize_pair(pair, tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    expected_prompt = [tiny_tokenizer.bos_token_id] + prompt_ids[-(max_prompt_length - 1) :]
    assert cut["chosen_input_ids"] == expected_prompt + chosen[:budget]
    assert cut["rejected_input_ids"] == expected_prompt + rejected  # shorter than the budget: untouched
    assert cut["chosen_labels"] == [IGNORE_INDEX] * max_prompt_length + chosen[:budget]
    assert len(cut["chosen_input_ids"]) == max_length
    assert cut["prompt_truncated"] == 1 and cut["response_truncated"] == 1


def test_short_prompt_is_kept_and_only_the_response_is_cut(tiny_tokenizer):
    pair = PreferencePair("hello", " world " * 20, " there")
    full = tokenize_pair(pair, tiny_tokenizer, max_length=1000, max_prompt_length=999)
    n_prompt = full["chosen_labels"].count(IGNORE_INDEX)
    chosen = _response_part(full, "chosen")
    cut = tokenize_pair(pair, tiny_tokenizer, max_length=12, max_prompt_length=8)
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:n_prompt] + chosen[: 12 - n_prompt]
    assert cut["rejected_input_ids"] == full["rejected_input_ids"]
    assert cut["prompt_truncated"] == 0 and cut["response_truncated"] == 1


def test_invalid_lengths_raise(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pair(PreferencePair("a", "b", "c"), tiny_tokenizer, max_length=8, max_prompt_length=8)


def test_response_without_tokens_raises_empty_response(no_eos_tokenizer):
    pair = PreferencePair("a", "\u200b", "b", source="x.jsonl:7")
    with pytest.raises(EmptyResponseError, match=r"x\.jsonl:7: the chosen response has no token"):
        tokenize_pair(pair, no_eos_tokenizer, 16, 8)


# --------------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------------


def test_collate_right_pads_to_longest_row_with_chosen_rows_first():
    features = [
        {"chosen_input_ids": [5, 7], "chosen_labels": [-100, 7], "rejected_input_ids": [5, 8, 8],
         "rejected_labels": [-100, 8, 8]},
        {"chosen_input_ids": [6, 9, 9, 9], "chosen_labels": [-100, -100, 9, 9], "rejected_input_ids": [6, 4],
         "rejected_labels": [-100, 4], "prompt_truncated": 1},
    ]  # fmt: skip
    batch = collate_pairs(features, pad_token_id=0)
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[5, 7, 0, 0], [6, 9, 9, 9], [5, 8, 8, 0], [6, 4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [
        [-100, 7, -100, -100],
        [-100, -100, 9, 9],
        [-100, 8, 8, -100],
        [-100, 4, -100, -100],
    ]
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long


def test_collate_rejects_empty_and_mismatched_features():
    with pytest.raises(ValueError, match="empty list"):
        collate_pairs([], pad_token_id=0)
    bad = {"chosen_input_ids": [1, 2], "chosen_labels": [2], "rejected_input_ids": [1], "rejected_labels": [1]}
    with pytest.raises(ValueError, match="differ in length"):
        collate_pairs([bad], pad_token_id=0)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(_TEXT, _TEXT, _TEXT), min_size=1, max_size=3),
    max_length=st.integers(1, 48),
    max_prompt_length=st.integers(1, 48),
    use_chat_template=st.booleans(),
)
def test_fuzz_tokenize_and_collate_label_mask_is_exactly_the_response(
    tiny_tokenizer, rows, max_length, max_prompt_length, use_chat_template
):
    """Random unicode pairs: a clear ValueError for impossible lengths, else a batch whose labels are a
    non-empty contiguous response suffix equal to the ids, and (untruncated) rows that decode to the text."""
    pairs = [PreferencePair(p, c, r, source=f"fuzz:{i}") for i, (p, c, r) in enumerate(rows)]
    if max_prompt_length >= max_length:
        with pytest.raises(ValueError, match="max_prompt_length"):
            tokenize_pair(pairs[0], tiny_tokenizer, max_length, max_prompt_length, use_chat_template)
        return
    features = [tokenize_pair(p, tiny_tokenizer, max_length, max_prompt_length, use_chat_template) for p in pairs]
    batch = collate_pairs(features, pad_token_id=tiny_tokenizer.pad_token_id)
    n, width = len(pairs), batch.input_ids.shape[1]
    assert batch.input_ids.shape == (
        2 * n,
        max(len(f[f"{s}_input_ids"]) for f in features for s in ("chosen", "rejected")),
    )
    for row in range(2 * n):
        pair, side, feature = pairs[row % n], ("chosen", "rejected")[row // n], features[row % n]
        length = int(batch.attention_mask[row].sum())
        assert 2 <= length <= max_length and batch.attention_mask[row, :length].all()
        assert batch.input_ids[row, 0] == tiny_tokenizer.bos_token_id
        response_mask = batch.labels[row] != IGNORE_INDEX
        start = int(response_mask.int().argmax())
        assert start >= 1 and response_mask.tolist() == [start <= i < length for i in range(width)]
        assert torch.equal(batch.labels[row, start:length], batch.input_ids[row, start:length])
        if feature["prompt_truncated"] or feature["response_truncated"]:
            continue
        response = getattr(pair, side)
        assert batch.input_ids[row, length - 1] == tiny_tokenizer.eos_token_id
        response_text = tiny_tokenizer.decode(batch.input_ids[row, start:length])
        assert response_text.endswith(response + "</s>")
        if not use_chat_template:
            assert tiny_tokenizer.decode(batch.input_ids[row, 1 : length - 1]) == pair.prompt + response
