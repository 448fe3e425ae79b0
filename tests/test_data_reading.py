"""Data pipeline, reading: file and hub readers, chat rows, validation reports and strict mode."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsepo_lightning.data import (
    PreferencePair,
    load_pairs,
)
from tests.conftest import DATA_FIXTURES as FIXTURES

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
