"""Unpaired examples (TRL's ``{prompt, completion, label}`` rows, for BCO): validation with every bad row reported by
file:line, field and fix; tokenisation as one side of a pair; (N, T) batches with labels; ``UnpairedDataModule``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsepo_lightning.data import (
    PreferencePair,
    UnpairedDataModule,
    UnpairedExample,
    collate_examples,
    load_examples,
    tokenize_example,
    tokenize_pair,
)
from sparsepo_lightning.data.readers import iter_file
from sparsepo_lightning.data.rows import UnpairedFieldNames
from sparsepo_lightning.data.validate import validate_examples
from sparsepo_lightning.errors import ConfigError, DataError
from sparsepo_lightning.types import IGNORE_INDEX

GOOD = [
    {"prompt": "hello", "completion": " world", "label": True},
    {"prompt": "the movie", "completion": " was terrible", "label": False},
    {"prompt": [{"role": "user", "content": "hello there"}], "completion": [{"role": "assistant", "content": "hi"}],
     "label": True},
    {"prompt": "", "completion": "how are you?", "label": False},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_rows_are_counted_with_file_line_field_and_fix(tmp_path):
    bad = [
        {"prompt": "p", "label": True},                                  # 5: no completion
        {"prompt": "p", "completion": "c", "label": 1},                  # 6: label not a bool
        {"prompt": "p", "completion": "c", "label": "true"},             # 7: label a string
        {"prompt": "p", "completion": "c"},                              # 8: no label
        {"prompt": "p", "completion": "   ", "label": True},             # 9: empty completion
        '{"prompt": "p", "completion": ',                                # 10: broken JSON
        ["p", "c", True],                                                # 11: not an object
        {"completion": "c", "label": False},                             # 12: no prompt
        {"prompt": "p", "completion": {"text": "c"}, "label": True},     # 13: completion of the wrong type
    ]
    path = write_rows(tmp_path / "rows.jsonl", GOOD + bad)
    examples, report = validate_examples(iter_file(path), UnpairedFieldNames(), source=str(path))
    assert [e.desirable for e in examples] == [True, False, True, False]
    assert examples[0] == UnpairedExample("hello", " world", True, f"{path}:1")
    assert report.rows_read == 13 and report.rows_kept == 4
    assert report.counts == {"missing_field": 3, "wrong_type": 4, "empty_response": 1, "bad_json": 1}
    first = report.first
    assert first["missing_field"].location == f"{path}:5" and first["missing_field"].field == "completion"
    assert first["wrong_type"].location == f"{path}:6" and first["wrong_type"].field == "label"
    assert "expected a boolean" in first["wrong_type"].message and "got int '1'" in first["wrong_type"].message
    assert first["empty_response"].location == f"{path}:9" and first["empty_response"].field == "completion"
    assert first["bad_json"].location == f"{path}:10"
    for issue in first.values():
        assert issue.message.startswith(f"{path}:") and "Fix:" in issue.message
    summary = report.summary()
    assert "kept 4 of 13 rows" in summary and f"rejected 4 x wrong_type; first at {path}:6" in summary


@pytest.mark.parametrize(("row", "reason", "field"), [
    ({"completion": "c", "label": True}, "missing_field", "prompt"),
    ({"prompt": "p", "completion": "c"}, "missing_field", "label"),
    ({"prompt": "p", "completion": "c", "label": None}, "missing_field", "label"),
    ({"prompt": "p", "completion": "c", "label": "false"}, "wrong_type", "label"),
    ({"prompt": 3, "completion": "c", "label": True}, "wrong_type", "prompt"),
    ({"prompt": "p", "completion": "", "label": False}, "empty_response", "completion"),
])
def test_each_bad_row_names_its_reason_and_field(row, reason, field, tmp_path):
    path = write_rows(tmp_path / "one.jsonl", [GOOD[0], row])
    _, report = validate_examples(iter_file(path), UnpairedFieldNames(), source=str(path))
    assert report.counts == {reason: 1}
    issue = report.first[reason]
    assert (issue.location, issue.field) == (f"{path}:2", field)
    assert f"{path}:2 field '{field}'" in issue.message


def test_strict_mode_stops_at_the_first_bad_row_and_load_examples_refuses_an_empty_result(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD[0], {"prompt": "p", "completion": "c", "label": 0}])
    with pytest.raises(DataError, match=rf"{path}:2 field 'label': expected a boolean.*Fix:.*strict=True"):
        load_examples(path, strict=True)
    examples, report = load_examples(path)
    assert len(examples) == 1 and report.counts == {"wrong_type": 1}
    empty = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match="no valid unpaired example"):
        load_examples(empty)


def test_field_names_are_configurable(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a", "good": False}])
    examples, _ = load_examples(path, prompt_field="question", completion_field="answer", label_field="good")
    assert examples == [UnpairedExample("q", "a", False, f"{path}:1")]


def test_tokenised_like_one_side_of_a_pair(tiny_tokenizer):
    example = UnpairedExample("hello there, how are", " you?", True, "x:1")
    features = tokenize_example(example, tiny_tokenizer, max_length=64, max_prompt_length=32)
    pair = tokenize_pair(PreferencePair("hello there, how are", " you?", " world"), tiny_tokenizer, 64, 32)
    assert features["input_ids"] == pair["chosen_input_ids"] and features["labels"] == pair["chosen_labels"]
    assert features["desirable"] is True and features["input_ids"][-1] == tiny_tokenizer.eos_token_id
    chat = UnpairedExample([{"role": "user", "content": "hello"}], [{"role": "assistant", "content": "hi"}], False)
    chat_pair = PreferencePair([{"role": "user", "content": "hello"}], [{"role": "assistant", "content": "hi"}], "no")
    assert tokenize_example(chat, tiny_tokenizer)["input_ids"] == tokenize_pair(chat_pair, tiny_tokenizer)[
        "chosen_input_ids"]


def test_truncation_looks_at_the_example_alone(tiny_tokenizer):
    long_prompt = "hello world " * 20
    short = tokenize_example(UnpairedExample(long_prompt, " hi", True), tiny_tokenizer, max_length=24,
                             max_prompt_length=8)
    assert len(short["input_ids"]) <= 24 and short["prompt_truncated"] == 1 and short["response_truncated"] == 0
    assert short["input_ids"][0] == tiny_tokenizer.bos_token_id  # the BOS is kept in front of the kept prompt end
    fits = tokenize_example(UnpairedExample("hello", " world", True), tiny_tokenizer, max_length=24,
                            max_prompt_length=8)
    assert fits["prompt_truncated"] == fits["response_truncated"] == 0


def test_empty_completion_after_tokenisation_names_the_completion(no_eos_tokenizer):
    from sparsepo_lightning.data.tokenize import EmptyResponseError

    with pytest.raises(EmptyResponseError, match="x:3: the completion has no token"):
        tokenize_example(UnpairedExample("a", "\u200b", True, "x:3"), no_eos_tokenizer, max_length=8,
                         max_prompt_length=4)


def test_collate_gives_n_rows_and_their_labels():
    features = [{"input_ids": [5, 7], "labels": [IGNORE_INDEX, 7], "desirable": True},
                {"input_ids": [5, 8, 8], "labels": [IGNORE_INDEX, 8, 8], "desirable": False},
                {"input_ids": [9, 9], "labels": [IGNORE_INDEX, 9], "desirable": False}]
    batch = collate_examples(features, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 7, 0], [5, 8, 8], [9, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
    pad = IGNORE_INDEX
    assert batch.labels.tolist() == [[pad, 7, pad], [pad, 8, 8], [pad, 9, pad]]
    assert batch.desirable.tolist() == [True, False, False] and batch.desirable.dtype == torch.bool
    with pytest.raises(ValueError, match="at least one example"):
        collate_examples([], pad_token_id=0)
    with pytest.raises(ValueError, match="differ in length"):
        collate_examples([{"input_ids": [1, 2], "labels": [2], "desirable": True}], pad_token_id=0)


def _datamodule(tokenizer, **kwargs) -> UnpairedDataModule:
    dm = UnpairedDataModule(**{"max_length": 64, "max_prompt_length": 32, "batch_size": 3, **kwargs})
    dm.tokenizer = tokenizer
    return dm


def test_datamodule_serves_n_by_t_batches_with_labels_and_reports_bad_rows(tiny_tokenizer, tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [*GOOD, {"prompt": "p", "completion": "c", "label": 1}, *GOOD[:2]])
    dm = _datamodule(tiny_tokenizer, train_file=str(path), val_file=str(path))
    dm.setup("fit")
    assert dm.report["train"].rows_read == 7 and dm.report["train"].counts == {"wrong_type": 1}
    assert dm.sources["val"][4] == f"{path}:6"  # the bad line 5 is skipped, not silently renumbered
    batches = list(dm.train_dataloader())
    assert [b.input_ids.shape[0] for b in batches] == [3, 3]
    for batch in batches:
        assert batch.desirable is not None and batch.desirable.shape == (3,)
        assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    val = list(dm.val_dataloader())
    assert torch.cat([b.desirable for b in val]).tolist() == [True, False, True, False, True, False]
    assert sorted(torch.cat([b.desirable for b in batches]).tolist()) == [False] * 3 + [True] * 3


def test_datamodule_check_sources_and_options(tiny_tokenizer, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    dm = _datamodule(tiny_tokenizer, train_file=str(bad))
    message = rf"(?s)data.train_file: no valid unpaired example in .*{bad}:1 field 'completion'"
    with pytest.raises(DataError, match=message):
        dm.check_sources("fit")
    with pytest.raises(ConfigError, match="data.chosen_field: UnpairedDataModule reads unpaired rows"):
        UnpairedDataModule(chosen_field="good")
    UnpairedDataModule(chosen_field="chosen", rejected_field="rejected")  # the defaults, as the CLI passes them
    good = write_rows(tmp_path / "good.jsonl", GOOD * 3)
    held = _datamodule(tiny_tokenizer, train_file=str(good), val_fraction=0.25)
    held.setup("fit")
    assert len(held.datasets["train"]) == 9 and len(held.datasets["val"]) == 3
