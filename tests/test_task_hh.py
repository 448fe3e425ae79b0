"""Anthropic HH loader: transcript parsing, the hub layout (local folder), reports, tokenisation, config parsing."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from sparsepo_lightning.data.readers import iter_file
from sparsepo_lightning.data.rows import Rejection
from sparsepo_lightning.tasks.hh import HHDataModule, TranscriptError, hh_row_to_pair, parse_hh_transcript
from sparsepo_lightning.types import IGNORE_INDEX

HUB = Path(__file__).parent / "fixtures" / "hub" / "hh-rlhf"
TRAIN = HUB / "helpful-base" / "train.jsonl"
SAMPLES = Path(__file__).parents[1] / "data" / "samples" / "hh"


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _datamodule(tokenizer, **kwargs) -> HHDataModule:
    kwargs = {"max_length": 256, "max_prompt_length": 128, "batch_size": 2, **kwargs}
    dm = HHDataModule(**kwargs)
    dm.tokenizer = tokenizer
    return dm


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------


def test_parse_splits_on_role_markers_and_keeps_continuation_paragraphs():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHow can I help?\n\nHuman:  Thanks \n\nAssistant:"
    assert parse_hh_transcript(text) == [
        _user("Hi there"),
        _assistant("Hello.\n\nHow can I help?"),
        _user("Thanks"),
        _assistant(""),
    ]


def test_a_role_name_inside_a_line_is_content_not_a_marker():
    text = "\n\nHuman: Write 'Assistant: yes' please\nHuman: twice\n\nAssistant: Assistant: yes"
    assert parse_hh_transcript(text) == [
        _user("Write 'Assistant: yes' please\nHuman: twice"),
        _assistant("Assistant: yes"),
    ]


@pytest.mark.parametrize("text", ["\n\nAssistant: Hi\n\nHuman: Hello", "Some preamble\n\nHuman: Hi", "", 3])
def test_transcripts_not_starting_with_human_are_unparsable(text):
    with pytest.raises(TranscriptError):
        parse_hh_transcript(text)


def test_fixture_rows_parse_to_these_exact_pairs():
    rows = _rows(TRAIN)
    assert hh_row_to_pair(**rows[0]) == {
        "prompt": [_user("How do I boil an egg?")],
        "chosen": [_assistant("Put the egg in boiling water for about nine minutes, then cool it in cold water.")],
        "rejected": [_assistant("Eggs are laid by hens.")],
    }
    assert hh_row_to_pair(**rows[1]) == {  # multi-turn, continuation paragraphs in two assistant turns
        "prompt": [
            _user("Can you suggest a name for my cat?"),
            _assistant("Here are a few ideas:\n\n1. Miso\n2. Pepper"),
            _user("She is grey and very calm."),
        ],
        "chosen": [_assistant("Then Misty could suit her.\n\nIt sounds soft and quiet, like her.")],
        "rejected": [_assistant("Call her Cat.")],
    }
    empty = hh_row_to_pair(**rows[2])  # reaches the generic validator, which counts it as empty_response
    assert empty["rejected"] == [_assistant("")]
    identical = hh_row_to_pair(**rows[3])
    assert identical["chosen"] == identical["rejected"] == [_assistant("Hello!")]


def test_rows_that_cannot_be_pairs_are_rejected_with_a_reason():
    rows = _rows(TRAIN)
    mismatch = hh_row_to_pair(**rows[4])
    assert isinstance(mismatch, Rejection) and (mismatch.reason, mismatch.field) == (
        "prompt_mismatch",
        "chosen/rejected",
    )
    starts_with_assistant = hh_row_to_pair(**rows[6])
    assert (starts_with_assistant.reason, starts_with_assistant.field) == ("unparsable_transcript", "chosen")
    no_assistant = hh_row_to_pair(**rows[7])
    assert no_assistant.reason == "unparsable_transcript" and "no Assistant turn" in no_assistant.problem
    ends_with_human = hh_row_to_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c\n\nHuman: d")
    assert (ends_with_human.field, ends_with_human.problem) == ("rejected", "the transcript ends with a Human turn")


# --------------------------------------------------------------------------------------------------------
# DataModule: reports, hub layout, tokenisation
# --------------------------------------------------------------------------------------------------------


def test_train_file_report_counts_every_bad_row_by_reason_with_its_first_line(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(TRAIN))
    assert dm.hub_dataset is None  # a local train_file replaces the default hub id
    dm.setup("fit")
    report = dm.report["train"]
    assert (report.rows_read, report.rows_kept, report.prompts_truncated) == (8, 3, 1)
    assert report.counts == {
        "empty_response": 1,
        "identical_responses": 1,
        "prompt_mismatch": 1,
        "unparsable_transcript": 2,
    }
    assert {reason: issue.location for reason, issue in report.first.items()} == {
        "empty_response": f"{TRAIN}:3",
        "identical_responses": f"{TRAIN}:4",
        "prompt_mismatch": f"{TRAIN}:5",
        "unparsable_transcript": f"{TRAIN}:7",
    }
    assert f"{TRAIN}:5 field 'chosen/rejected': the dialogues before the last Assistant turn differ" in report.summary()
    assert len(dm.datasets["train"]) == 3 and dm.datasets["val"] == []


def test_strict_mode_stops_at_the_first_unconvertible_row(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(TRAIN), strict=True)
    with pytest.raises(ValueError, match=r"train.jsonl:3 field 'rejected': the response is empty"):
        dm.setup("fit")


def test_labels_mask_the_whole_templated_dialogue_and_keep_the_final_turn_plus_eos(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(TRAIN))
    dm.setup("fit")
    features = dm.datasets["train"][1]  # the multi-turn cat row (file line 2)
    pair = hh_row_to_pair(**_rows(TRAIN)[1])
    prompt_text = tiny_tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    prompt_ids = tiny_tokenizer(prompt_text, add_special_tokens=False).input_ids
    assert prompt_ids[0] == tiny_tokenizer.bos_token_id and prompt_text.count("<|user|>") == 2
    for side in ("chosen", "rejected"):
        response = pair[side][0]["content"]
        response_ids = tiny_tokenizer(response, add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
        assert features[f"{side}_input_ids"] == prompt_ids + response_ids
        assert features[f"{side}_labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_an_overlong_dialogue_is_cut_from_the_left_keeping_bos_and_the_last_turns(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(TRAIN))
    dm.setup("fit")
    features = dm.datasets["train"][2]  # the balcony-garden row (file line 6): prompt of ~430 tokens
    labels = features["chosen_labels"]
    n_prompt = sum(label == IGNORE_INDEX for label in labels)
    assert n_prompt == 128
    assert features["chosen_input_ids"][0] == tiny_tokenizer.bos_token_id
    kept_prompt = tiny_tokenizer.decode(features["chosen_input_ids"][1:n_prompt])
    assert kept_prompt.endswith("Which plants should I choose for morning sun only?</s><|assistant|>\n")
    assert "balcony" not in kept_prompt
    assert tiny_tokenizer.decode(labels[n_prompt:]) == "Try lettuce, parsley and mint: they like cool mornings.</s>"


def test_local_folder_in_hub_layout_loads_the_four_preference_subsets_and_skips_red_team(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(HUB))
    dm.prepare_data()
    dm.setup("fit")
    # harmless-base (2 train, 1 test) + helpful-base (8 train of which 3 usable, 2 test); red-team not read
    assert (dm.report["train"].rows_read, dm.report["train"].rows_kept) == (10, 5)
    assert (dm.report["val"].rows_read, len(dm.datasets["val"])) == (3, 3)
    assert dm.report["train"].source == f"{HUB}[train]" and dm.report["val"].source == f"{HUB}[test]"
    assert dm.report["train"].counts["unparsable_transcript"] == 2


def test_hub_kwargs_data_dir_selects_one_subset_with_the_same_report_as_the_file(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(HUB), hub_kwargs={"data_dir": "helpful-base"})
    dm.setup("fit")
    report = dm.report["train"]
    from_file = _datamodule(tiny_tokenizer, train_file=str(TRAIN))
    from_file.setup("fit")
    assert report.counts == from_file.report["train"].counts and report.rows_kept == 3
    assert report.first["prompt_mismatch"].location == f"{HUB}[train]#4"  # 0-based index = file line 5
    assert dm.datasets["train"] == from_file.datasets["train"]
    assert len(dm.datasets["val"]) == 2


def test_gzipped_jsonl_like_the_real_hub_files_load_the_same(tiny_tokenizer, tmp_path):
    root = tmp_path / "hh-rlhf"
    for path in HUB.rglob("*.jsonl"):
        target = root / path.relative_to(HUB).with_suffix(".jsonl.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt", encoding="utf-8") as f:
            shutil.copyfileobj(path.open(encoding="utf-8"), f)
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(root))
    dm.setup("fit")
    assert (dm.report["train"].rows_read, dm.report["train"].rows_kept, len(dm.datasets["val"])) == (10, 5, 3)


def test_red_team_subset_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"data_dir='red-team-attempts'.*not preference pairs"):
        HHDataModule(hub_kwargs={"data_dir": "red-team-attempts"})


def test_rows_in_another_schema_are_counted_not_dropped(tiny_tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [_rows(TRAIN)[0], {"transcript": "\n\nHuman: hi\n\nAssistant: hello"}, {"chosen": "x", "rejected": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = _datamodule(tiny_tokenizer, train_file=str(path))
    dm.setup("fit")
    assert dm.report["train"].counts == {"missing_field": 1, "wrong_type": 1}


def test_system_prompt_is_prepended_to_every_prompt(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(TRAIN), system_prompt="")
    first = next(iter(dm.convert_rows(iter_file(TRAIN), "train")))
    assert first.value["prompt"] == [{"role": "system", "content": ""}, _user("How do I boil an egg?")]
    dm.setup("fit")
    features = dm.datasets["train"][0]
    n_prompt = features["chosen_labels"].count(IGNORE_INDEX)
    prompt_text = tiny_tokenizer.decode(features["chosen_input_ids"][:n_prompt])
    assert prompt_text == "<s><|system|>\n</s><|user|>\nHow do I boil an egg?</s><|assistant|>\n"


def test_yaml_class_path_sees_the_parent_options():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = {
        "class_path": "sparsepo_lightning.tasks.hh.HHDataModule",
        "init_args": {"max_length": 1024, "max_prompt_length": 512, "hub_kwargs": {"data_dir": "helpful-base"}},
    }
    cfg = parser.parse_args([f"--data={json.dumps(config)}"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, HHDataModule)
    assert (dm.max_length, dm.max_prompt_length, dm.hub_dataset) == (1024, 512, "Anthropic/hh-rlhf")
    assert dm.hub_kwargs == {"data_dir": "helpful-base"} and (dm.train_split, dm.val_split) == ("train", "test")


def test_shipped_sample_loads_without_rejections(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(SAMPLES), max_length=512, max_prompt_length=256)
    dm.setup("fit")
    assert dm.report["train"].rows_rejected == 0 and dm.report["val"].rows_rejected == 0
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) >= 30
