"""Fuzzing (hypothesis) of the data parsers and the collator: random unicode, bytes, JSON values, empty strings and
huge rows give valid pairs / batches or a clear error (counted rejection or ValueError), never a crash or a wrong
label mask."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsepo_lightning.data.collate import collate_pairs
from sparsepo_lightning.data.readers import iter_json, iter_jsonl
from sparsepo_lightning.data.rows import FieldNames, PreferencePair, RawRow, Rejection
from sparsepo_lightning.data.validate import validate_rows
from sparsepo_lightning.tasks.hh import TranscriptError, hh_row_to_pair, parse_hh_transcript
from sparsepo_lightning.tasks.imdb import odpo_pairs
from sparsepo_lightning.tasks.tldr import BadRow, axis_rows_to_pairs, comparison_to_pair
from sparsepo_lightning.types import IGNORE_INDEX

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
KEYS = st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "text", "reward", "info", "x", ""])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT})
FIELD = TEXT | st.lists(MESSAGE, max_size=3) | JSON
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "other"]), FIELD, max_size=4) | JSON


def _check_pairs(pairs: list[PreferencePair], report, n_rows: int) -> None:
    """Every row is either a pair or counted once; kept pairs are non-empty and not identical."""
    assert report.rows_read == n_rows and report.rows_kept == len(pairs)
    assert sum(report.counts.values()) == n_rows - len(pairs)
    assert set(report.first) == set(report.counts)
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            assert isinstance(response, str | list) and response
        assert pair.chosen != pair.rejected and pair.source
    report.summary()  # renders


@FUZZ
@given(rows=st.lists(ROW, max_size=6), strict=st.booleans())
def test_fuzz_validate_rows_counts_every_row_or_raises_value_error(rows, strict):
    raw = [RawRow(f"fuzz:{i}", value) for i, value in enumerate(rows)]
    try:
        pairs, report = validate_rows(raw, FieldNames(), source="fuzz", strict=strict)
    except ValueError as e:
        assert strict and "Fix:" in str(e) and "fuzz:" in str(e)
        return
    _check_pairs(pairs, report, len(rows))


@FUZZ
@given(lines=st.lists(st.binary(max_size=60) | ROW.map(lambda v: json.dumps(v).encode()) | TEXT.map(str.encode),
                      max_size=6))
def test_fuzz_jsonl_bytes_are_rows_or_bad_json_rejections(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    lines = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = list(iter_jsonl(path))
    lines[:1] = [line.removeprefix(b"\xef\xbb\xbf") for line in lines[:1]]  # a BOM is dropped from line 1
    non_blank = [i + 1 for i, line in enumerate(lines) if line.strip() and _utf8_or_none(line) != ""]
    assert [r.location for r in rows] == [f"{path}:{n}" for n in non_blank]
    pairs, report = validate_rows(rows, FieldNames(), source=str(path))
    _check_pairs(pairs, report, len(rows))


def _utf8_or_none(line: bytes) -> str | None:
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


@FUZZ
@given(document=JSON | st.lists(ROW, max_size=5) | st.fixed_dictionaries({"data": st.lists(ROW, max_size=4)}))
def test_fuzz_json_documents_give_rows_or_a_clear_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("json") / "x.json"
    path.write_text(json.dumps(document, indent=1))
    try:
        rows = list(iter_json(path))
    except ValueError as e:
        assert "expected a JSON list of rows" in str(e) and "Fix:" in str(e)
        return
    pairs, report = validate_rows(rows, FieldNames(), source=str(path))
    _check_pairs(pairs, report, len(rows))


def test_huge_and_hostile_lines_are_rejections_not_crashes(tmp_path):
    path = tmp_path / "x.jsonl"
    good = json.dumps({"prompt": "p" * 1_000_000, "chosen": "a", "rejected": "b"})
    path.write_bytes(b"\n".join([b"[" * 200_000, b"\xff\xfe\x00garbage", good.encode(), b"{" * 50 + b"}"]) + b"\n")
    pairs, report = validate_rows(iter_jsonl(path), FieldNames(), source=str(path))
    assert len(pairs) == 1 and len(pairs[0].prompt) == 1_000_000
    assert report.counts == {"bad_json": 3} and report.first["bad_json"].location == f"{path}:1"
    (tmp_path / "deep.json").write_text("[" * 200_000)
    (row,) = iter_json(tmp_path / "deep.json")
    assert row.decode_error is not None
    (tmp_path / "latin1.json").write_bytes(b'[{"prompt": "caf\xe9"}]')
    (row,) = iter_json(tmp_path / "latin1.json")
    assert "UTF-8" in row.decode_error


TURN = st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", "\n\nHuman: ", "\n\n", " Assistant: "])


@FUZZ
@given(parts=st.lists(TURN | TEXT, max_size=8), other=st.lists(TURN | TEXT, max_size=8))
def test_fuzz_hh_transcripts_parse_or_raise_transcript_error(parts, other):
    text = "".join(parts)
    try:
        messages = parse_hh_transcript(text)
    except TranscriptError as e:
        assert "Human:" in str(e)
    else:
        assert messages and messages[0]["role"] == "user"
        assert all(m["role"] in ("user", "assistant") and m["content"] == m["content"].strip() for m in messages)
    pair = hh_row_to_pair(text, "".join(other))
    if isinstance(pair, dict):
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert all(m["role"] in ("user", "assistant") for m in pair["prompt"])
    else:
        assert isinstance(pair, Rejection) and pair.fix


INFO = st.fixed_dictionaries({}, optional={"post": TEXT | JSON, "article": TEXT | JSON, "subreddit": TEXT | JSON,
                                           "title": TEXT | JSON, "id": TEXT | st.integers() | st.none()})
SUMMARY = st.fixed_dictionaries({}, optional={"text": TEXT | JSON, "axes": JSON | st.fixed_dictionaries(
    {}, optional={"overall": st.integers(1, 7) | JSON})})


@FUZZ
@given(value=JSON | st.fixed_dictionaries({}, optional={"info": INFO | JSON, "summaries": st.lists(SUMMARY, max_size=3)
                                                     | JSON, "choice": st.integers(-1, 2) | JSON}))
def test_fuzz_tldr_comparisons_convert_or_raise_bad_row(value):
    try:
        pair = comparison_to_pair(value)
    except BadRow as e:
        assert e.rejection.reason and e.rejection.fix
        return
    assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"].endswith("TL;DR:")


@FUZZ
@given(values=st.lists(JSON | st.fixed_dictionaries({"info": INFO, "summary": SUMMARY}), max_size=6))
def test_fuzz_tldr_axis_rows_become_pairs_or_rejections(values):
    rows = [RawRow(f"axis:{i}", v) for i, v in enumerate(values)]
    out = list(axis_rows_to_pairs(rows))
    pairs, report = validate_rows(out, FieldNames(), source="axis")
    _check_pairs(pairs, report, len(out))


SAMPLE = st.fixed_dictionaries({}, optional={"prompt": st.sampled_from(["The movie", "I", ""]) | JSON,
                                             "text": TEXT | JSON, "reward": st.floats() | JSON})


@FUZZ
@given(values=st.lists(SAMPLE | JSON, max_size=8), pairing=st.sampled_from(["first_two", "best_worst"]))
def test_fuzz_imdb_odpo_grouping_gives_pairs_or_rejections(values, pairing):
    rows = [RawRow(f"odpo:{i}", v) for i, v in enumerate(values)]
    out = list(odpo_pairs(rows, pairing=pairing))
    for row in out:
        if row.value is not None and row.rejection is None:
            assert row.value["chosen_score"] > row.value["rejected_score"]
            assert math.isfinite(row.value["chosen_score"]) and row.value["num_samples"] >= 2
    pairs, report = validate_rows(out, FieldNames(), source="odpo")
    _check_pairs(pairs, report, len(out))


@st.composite
def features(draw):
    """B tokenised pairs: prompt ids (labels -100) then response ids (labels = ids), sometimes malformed."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        feature = {}
        for side in ("chosen", "rejected"):
            prompt = draw(st.lists(st.integers(0, 50), max_size=6))
            response = draw(st.lists(st.integers(0, 50), max_size=6))
            feature[f"{side}_input_ids"] = prompt + response
            feature[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
        out.append(feature)
    if draw(st.booleans()) and draw(st.booleans()):  # 1 in 4: drop a label to make one row inconsistent
        labels = out[0]["chosen_labels"]
        if labels:
            labels.pop()
    return out


@FUZZ
@given(batch_features=features(), pad=st.integers(0, 3))
def test_fuzz_collate_gives_the_exact_label_mask_or_value_error(batch_features, pad):
    rows = [(f[f"{s}_input_ids"], f[f"{s}_labels"]) for s in ("chosen", "rejected") for f in batch_features]
    if any(len(ids) != len(labels) for ids, labels in rows):
        with pytest.raises(ValueError, match="differ in length"):
            collate_pairs(batch_features, pad_token_id=pad)
        return
    batch = collate_pairs(batch_features, pad_token_id=pad)
    width = max([1, *(len(ids) for ids, _ in rows)]) if any(ids for ids, _ in rows) else 0
    assert batch.input_ids.shape == (len(rows), width)
    for r, (ids, labels) in enumerate(rows):
        n = len(ids)
        assert batch.input_ids[r, :n].tolist() == ids and (batch.input_ids[r, n:] == pad).all()
        assert batch.labels[r, :n].tolist() == labels and (batch.labels[r, n:] == IGNORE_INDEX).all()
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (width - n)
        trained = batch.labels[r] != IGNORE_INDEX
        assert torch.equal(batch.labels[r][trained], batch.input_ids[r][trained])
