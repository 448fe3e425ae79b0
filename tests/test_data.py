"""Data pipeline: readers, validation reports, tokenisation (labels, BOS/EOS, truncation), collate, DataModule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from sparsepo_lightning.data import (
    DataReport,
    PreferenceDataModule,
    PreferencePair,
    collate_pairs,
    load_pairs,
    tokenize_pair,
)
from sparsepo_lightning.data.tokenize import EmptyResponseError
from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _response_part(features: dict, side: str) -> list[int]:
    return [t for t in features[f"{side}_labels"] if t != IGNORE_INDEX]


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------


def test_jsonl_rows_are_located_by_file_line_and_blank_lines_skipped():
    pairs, report = load_pairs(FIXTURES / "pairs.jsonl")
    assert len(pairs) == 6 and report.rows_read == 6 and report.rows_rejected == 0
    assert pairs[0] == PreferencePair(
        prompt="The movie was",
        chosen=" great and the actors were wonderful.",
        rejected=" terrible; I left early.",
        source=f"{FIXTURES / 'pairs.jsonl'}:1",
    )
    assert pairs[2].source.endswith("pairs.jsonl:4")  # line 3 is blank


def test_json_list_and_data_object_name_the_line_each_row_starts_on():
    pairs, _ = load_pairs(FIXTURES / "list.json")
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["2", "3"]
    pairs, report = load_pairs(FIXTURES / "pairs.json")
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["4", "5"]
    assert report.counts == {"identical_responses": 1}
    assert report.first["identical_responses"].location.endswith("pairs.json:10")


def test_json_syntax_error_names_file_and_line_and_leaves_no_rows():
    with pytest.raises(ValueError, match=r"broken\.json:3: invalid JSON") as error:
        load_pairs(FIXTURES / "broken.json")
    assert "bad_json" in str(error.value)


def test_json_without_row_list_is_rejected_with_the_fix(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="'data' or 'train' list"):
        load_pairs(path)


def test_parquet_rows_numbered_from_one_and_chat_structs_become_messages(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello world", "rejected": "go away"},
        {"prompt": [{"role": "user", "content": "yo"}], "chosen": "hello", "rejected": "hello"},
        {"prompt": [{"role": "user", "content": "ok"}], "chosen": "fine", "rejected": "bad"},
    ]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    pairs, report = load_pairs(path)
    assert [p.source for p in pairs] == [f"{path} row 1", f"{path} row 3"]
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}]
    assert report.first["identical_responses"].location == f"{path} row 2"


def test_hub_rows_are_named_by_split_and_index(monkeypatch):
    import datasets

    rows = [{"q": "hello", "good": " world", "bad": " there"}, {"q": "hello", "good": " world"}]
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = load_pairs(
        hub_dataset="org/prefs", hub_config="cfg", split="test", prompt_field="q", chosen_field="good",
        rejected_field="bad",
    )  # fmt: skip
    assert calls == [("org/prefs", "cfg", "test")]
    assert pairs[0].source == "org/prefs[test]#0" and pairs[0].chosen == " world"
    assert report.first["missing_field"].location == "org/prefs[test]#1"
    assert "set rejected_field" in report.first["missing_field"].message


def test_unsupported_suffix_and_missing_file_raise(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(FIXTURES / "nope.jsonl")


# --------------------------------------------------------------------------------------------------------
# Chat rows and validation reports
# --------------------------------------------------------------------------------------------------------


def test_chat_rows_explicit_mixed_and_implicit_prompt():
    pairs, report = load_pairs(FIXTURES / "chat.jsonl")
    assert report.rows_rejected == 0
    explicit, mixed, implicit = pairs
    assert explicit.prompt[0] == {"role": "system", "content": ""}
    assert explicit.chosen == [{"role": "assistant", "content": "It was great."}]
    assert mixed.prompt == "Say hello." and mixed.chosen == "hello world"
    assert [m["content"] for m in implicit.prompt] == ["Hi!", "hello there", "How are you?"]
    assert implicit.chosen == [{"role": "assistant", "content": "Great, thanks."}]
    assert implicit.rejected == [{"role": "assistant", "content": "Leave me alone."}]


def test_every_rejection_reason_is_counted_with_its_first_location():
    path = FIXTURES / "bad_rows.jsonl"
    pairs, report = load_pairs(path)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:10"]
    assert report.counts == {
        "bad_json": 1,
        "missing_field": 3,
        "wrong_type": 2,
        "empty_response": 1,
        "identical_responses": 1,
    }
    assert report.rows_read == 10 and report.rows_kept == 2
    expected_first = {
        "bad_json": (2, None),
        "missing_field": (3, "rejected"),
        "wrong_type": (4, "chosen"),
        "empty_response": (5, "chosen"),
        "identical_responses": (6, "chosen/rejected"),
    }
    for reason, (line, field) in expected_first.items():
        issue = report.first[reason]
        assert (issue.location, issue.field) == (f"{path}:{line}", field)
        assert issue.message.startswith(f"{path}:{line}") and "Fix:" in issue.message
    summary = report.summary()
    assert "kept 2 of 10 rows" in summary
    assert f"rejected 3 x missing_field; first at {path}:3 field 'rejected'" in summary


def test_implicit_prompt_without_shared_prefix_is_a_missing_prompt():
    rows = [
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        }
    ]
    from sparsepo_lightning.data.rows import FieldNames, RawRow
    from sparsepo_lightning.data.validate import validate_rows

    pairs, report = validate_rows([RawRow("mem:1", r) for r in rows], FieldNames(), source="mem")
    assert pairs == [] and report.counts == {"missing_field": 1}
    assert "share no leading messages" in report.first["missing_field"].message


def test_strict_mode_raises_on_first_bad_row_with_file_line_field_and_fix():
    with pytest.raises(ValueError) as error:
        load_pairs(FIXTURES / "bad_rows.jsonl", strict=True)
    message = str(error.value)
    assert "bad_rows.jsonl:2: invalid JSON" in message and "Fix:" in message and "strict=False" in message
    with pytest.raises(ValueError, match=r"all_bad\.jsonl:1 field 'chosen/rejected': .*identical.*Fix: remove"):
        load_pairs(FIXTURES / "all_bad.jsonl", strict=True)


def test_file_without_any_valid_row_raises_with_the_summary():
    with pytest.raises(ValueError, match="no valid preference pair") as error:
        load_pairs(FIXTURES / "all_bad.jsonl")
    assert "kept 0 of 2 rows" in str(error.value)
    assert "identical_responses" in str(error.value) and "missing_field" in str(error.value)


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


@pytest.fixture(scope="module")
def no_eos_tokenizer():
    """WordLevel tokenizer without EOS whose normalizer deletes U+200B, so '\u200b' tokenises to nothing."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace("\u200b", "")
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


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


# --------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------


def _datamodule(tokenizer, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(**{"max_length": 64, "max_prompt_length": 32, "batch_size": 2, **kwargs})
    dm.tokenizer = tokenizer
    return dm


def test_datamodule_end_to_end_gives_2b_by_t_batches(tiny_tokenizer):
    dm = _datamodule(
        tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_file=str(FIXTURES / "chat.jsonl"),
        test_file=str(FIXTURES / "list.json"),
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert isinstance(batch, PreferenceBatch)
        assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape == batch.labels.shape
        lengths = batch.attention_mask.sum(1)
        assert batch.input_ids.shape[1] == int(lengths.max())  # padded to the longest row, not max_length
    val = list(dm.val_dataloader())
    assert [b.input_ids.shape[0] for b in val] == [4, 2]
    assert dm.report["train"].rows_kept == 6 and dm.report["val"].rows_kept == 3
    dm.setup("test")
    assert [b.input_ids.shape[0] for b in dm.test_dataloader()] == [4]


def test_datamodule_fit_after_validate_still_loads_train(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_file=str(FIXTURES / "chat.jsonl"))
    dm.setup("validate")
    assert "train" not in dm.datasets and len(dm.datasets["val"]) == 3
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6


def test_datamodule_train_order_depends_on_seed_and_pass_and_resumes_from_state(tiny_tokenizer):
    """A resumed run (fresh DataModule + saved state) must replay pass 2 of an uninterrupted run."""

    def datamodule(seed: int) -> PreferenceDataModule:
        dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), seed=seed, batch_size=6)
        dm.setup("fit")
        return dm

    def next_pass(loader) -> list[list[int]]:
        return next(iter(loader)).input_ids[:6, :4].tolist()

    uninterrupted = datamodule(1)
    loader = uninterrupted.train_dataloader()
    pass0 = next_pass(loader)
    state = uninterrupted.state_dict()
    pass1 = next_pass(loader)
    assert state == {"train_passes": 1, "train_batches_done": 0, "train_pass_complete": True} and pass0 != pass1
    resumed = datamodule(1)
    resumed.load_state_dict(state)
    assert next_pass(resumed.train_dataloader()) == pass1
    assert next_pass(datamodule(1).train_dataloader()) == pass0
    assert next_pass(datamodule(2).train_dataloader()) != pass0
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)  # Lightning swaps it under DDP


def test_datamodule_val_fraction_holds_out_seeded_pairs(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2
    other = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_fraction=0.34)
    other.setup("fit")
    assert other.datasets["val"] == dm.datasets["val"]
    assert "hold-out" in dm.report["val"].source


def test_datamodule_without_validation_source_returns_no_val_batches(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), max_train_samples=3)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and len(dm.datasets["train"]) == 3


def test_datamodule_counts_bad_rows_and_warns_once(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "bad_rows.jsonl"))
    with pytest.warns(UserWarning, match="skipped 8 bad rows") as record:
        dm.setup("fit")
    assert len([w for w in record if "bad rows" in str(w.message)]) == 1
    assert isinstance(dm.report["train"], DataReport) and dm.report["train"].rows_kept == 2
    strict = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "bad_rows.jsonl"), strict=True)
    with pytest.raises(ValueError, match=r"bad_rows\.jsonl:2"):
        strict.setup("fit")


def test_datamodule_reports_truncation(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), max_length=8, max_prompt_length=4)
    dm.setup("fit")
    report = dm.report["train"]
    assert report.prompts_truncated >= 1 and report.responses_truncated >= 1
    assert "truncated (kept)" in report.summary()
    assert all(len(f["chosen_input_ids"]) <= 8 for f in dm.datasets["train"])


def test_datamodule_counts_responses_without_tokens(no_eos_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "a"}\n{"prompt": "a", "chosen": "\\u200b", "rejected": "b"}\n'
    )
    dm = _datamodule(no_eos_tokenizer, train_file=str(path))
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        dm.setup("fit")
    assert dm.report["train"].counts == {"empty_response": 1}
    assert dm.report["train"].first["empty_response"].location == f"{path}:2"


def test_datamodule_loads_tokenizer_from_local_path_and_pads_with_eos(gpt2_style_tokenizer, tmp_path):
    gpt2_style_tokenizer.save_pretrained(tmp_path / "tok")
    dm = PreferenceDataModule(tokenizer=str(tmp_path / "tok"), train_file=str(FIXTURES / "pairs.jsonl"),
                              max_length=64, max_prompt_length=32, batch_size=6)  # fmt: skip
    with pytest.warns(UserWarning, match="no pad token") as record:
        dm.setup("fit")
        dm.setup("fit")
    assert len([w for w in record if "no pad token" in str(w.message)]) == 1
    batch = next(iter(dm.train_dataloader()))
    eos = gpt2_style_tokenizer.eos_token_id
    assert dm.pad_token_id == eos
    assert (batch.input_ids[batch.attention_mask == 0] == eos).all()
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()


def test_datamodule_option_errors_name_the_fix(tiny_tokenizer):
    with pytest.raises(ValueError, match="val_fraction: 0"):
        PreferenceDataModule(train_file="a.jsonl", val_file="b.jsonl", val_fraction=0.1)
    with pytest.raises(ValueError, match="val_split: null"):
        PreferenceDataModule(hub_dataset="org/x", val_fraction=0.1)
    with pytest.raises(ValueError, match="either train_file or hub_dataset"):
        PreferenceDataModule(train_file="a.jsonl", hub_dataset="org/x")
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PreferenceDataModule(train_file="a.jsonl").setup("fit")
    with pytest.raises(ValueError, match="needs data.train_file"):
        _datamodule(tiny_tokenizer).setup("fit")


def test_datamodule_hub_source_reads_train_and_val_splits(tiny_tokenizer, monkeypatch):
    import datasets

    splits = {
        "train": [{"prompt": "hello", "chosen": " world", "rejected": " there"}] * 3,
        "test": [{"prompt": "The movie was", "chosen": " great.", "rejected": " bad."}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_list(splits[split]))
    dm = _datamodule(copy.deepcopy(tiny_tokenizer), hub_dataset="org/prefs")
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    assert dm.report["val"].source == "org/prefs[test]"


def test_add_bos_option_forces_or_suppresses_the_bos(tiny_tokenizer, gpt2_style_tokenizer):
    pair = PreferencePair("The movie was", " great.", " bad.", source="x")
    bos = tiny_tokenizer.bos_token_id
    assert tokenize_pair(pair, tiny_tokenizer)["chosen_input_ids"][0] == bos
    off = tokenize_pair(pair, tiny_tokenizer, add_bos=False)
    assert off["chosen_input_ids"] == _ids(tiny_tokenizer, "The movie was great.") + [tiny_tokenizer.eos_token_id]
    on = tokenize_pair(pair, gpt2_style_tokenizer, add_bos=True)["chosen_input_ids"]
    assert on[0] == gpt2_style_tokenizer.bos_token_id and on.count(gpt2_style_tokenizer.bos_token_id) == 2  # bos, eos


class _UpperCaseRows(PreferenceDataModule):
    """A task loader through the ``convert_rows`` hook: schema ``{q, good, bad}``; rows with ``bad == None``
    are refused with a task-specific reason."""

    def convert_rows(self, rows, split):
        from sparsepo_lightning.data.rows import RawRow, Rejection

        for row in rows:
            value = row.value
            if value.get("bad") is None:
                yield RawRow(row.location, rejection=Rejection("no_rejected", "bad", "no rejected answer", "drop it"))
                continue
            yield RawRow(row.location, {"prompt": value["q"], "chosen": value["good"], "rejected": value["bad"]})


def test_convert_rows_hook_runs_on_files_and_counts_task_rejections(tiny_tokenizer, tmp_path):
    path = tmp_path / "own.jsonl"
    rows = [{"q": "hello", "good": " world", "bad": " there"}, {"q": "hello", "good": " x", "bad": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = _UpperCaseRows(max_length=64, max_prompt_length=32, batch_size=2, train_file=str(path))
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    report = dm.report["train"]
    assert report.rows_read == 2 and report.counts == {"no_rejected": 1}
    assert f"{path}:2 field 'bad': no rejected answer. Fix: drop it." in report.summary()
    strict = _UpperCaseRows(max_length=64, max_prompt_length=32, train_file=str(path), strict=True)
    strict.tokenizer = tiny_tokenizer
    with pytest.raises(ValueError, match=r"own.jsonl:2 field 'bad'"):
        strict.setup("fit")


def test_hub_dataset_may_be_a_local_folder_in_hub_layout(tiny_tokenizer, tmp_path):
    root = tmp_path / "org-prefs"
    (root / "subset-a").mkdir(parents=True)
    (root / "subset-b").mkdir()
    row = {"prompt": "hello", "chosen": " world", "rejected": " there"}
    for subset, n in (("subset-a", 2), ("subset-b", 3)):
        (root / subset / "train.jsonl").write_text((json.dumps(row) + "\n") * n)
        (root / subset / "test.jsonl").write_text(json.dumps(row) + "\n")
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(root), hub_kwargs={"data_dir": "subset-b"})
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    assert dm.report["train"].source == f"{root}[train]"


def test_builtin_zephyr_chat_template_for_tokenizers_without_one(gpt2_style_tokenizer, tmp_path):
    """docs/method.md §6.1: ``<|system|>\\n{content}<eos><|user|>\\n...<eos><|assistant|>\\n{response}<eos>``."""
    path = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "hello"}],
           "chosen": [{"role": "assistant", "content": "hello there"}], "rejected": "hello world"}
    path.write_text(json.dumps(row) + "\n")
    tokenizer = copy.deepcopy(gpt2_style_tokenizer)
    dm = _datamodule(tokenizer, train_file=str(path), chat_template="zephyr")
    dm.setup("fit")
    eos = tokenizer.eos_token
    rendered = tokenizer.decode(dm.datasets["train"][0]["chosen_input_ids"])
    assert rendered == f"<|system|>\n{eos}<|user|>\nhello{eos}<|assistant|>\nhello there{eos}"
    labels = dm.datasets["train"][0]["rejected_labels"]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == f"hello world{eos}"
    with pytest.raises(ValueError, match="neither a built-in name"):
        PreferenceDataModule(chat_template="chatml")
