"""TL;DR loader: prompt format, comparisons and axis conversion, reports, the hub layout, tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsepo_lightning.data.rows import RawRow
from sparsepo_lightning.tasks.tldr import (
    TLDR_HUB_ID,
    BadRow,
    TLDRDataModule,
    axis_rows_to_pairs,
    comparison_to_pair,
    tldr_prompt,
)
from sparsepo_lightning.types import IGNORE_INDEX

HUB = Path(__file__).parent / "fixtures" / "hub" / "summarize_from_feedback"
COMPARISONS = HUB / "comparisons" / "train" / "0000.jsonl"
AXIS = HUB / "axis" / "validation" / "0000.jsonl"
SAMPLES = Path(__file__).parents[1] / "data" / "samples" / "tldr"

BIKE_PROMPT = (
    "SUBREDDIT: r/bicycling\nTITLE: Used bike has slipping gears, fix myself or go to a shop?\n"
    "POST: I bought a used bike last week. The gears slip when I go uphill and the chain makes a clicking noise. "
    "The seller says it was fine. Should I fix it myself or take it to a shop?\nTL;DR:"
)
PLANT_PROMPT = (
    "SUBREDDIT: r/gardening\nTITLE: Yellow droopy basil\nPOST: I overwatered my basil and now the leaves are "
    "yellow and droopy. Can I still save it?\nTL;DR:"
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _datamodule(tokenizer, **kwargs) -> TLDRDataModule:
    kwargs = {"max_length": 512, "max_prompt_length": 448, "batch_size": 2, **kwargs}
    dm = TLDRDataModule(**kwargs)
    dm.tokenizer = tokenizer
    return dm


# --------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------


def test_comparison_rows_give_prompt_and_the_chosen_summary_by_choice():
    rows = _rows(COMPARISONS)
    assert comparison_to_pair(rows[0]) == {  # choice = 0
        "prompt": BIKE_PROMPT,
        "chosen": " Used bike's gears slip uphill and chain clicks; fix it myself or go to a shop?",
        "rejected": " I bought a bike.",
    }
    assert comparison_to_pair(rows[1]) == {  # choice = 1
        "prompt": BIKE_PROMPT,
        "chosen": " New used bike slips gears and clicks; DIY or bike shop?",
        "rejected": " Bike is broken.",
    }


def test_news_rows_without_a_post_use_the_article_prompt():
    pair = comparison_to_pair(_rows(COMPARISONS)[2])
    assert pair["prompt"] == (
        "ARTICLE: (CNN) A city library opened a tool lending shelf this week. Residents can borrow drills, ladders "
        "and garden tools for up to seven days with a library card. Staff said more than two hundred items were "
        "borrowed on the first day.\nTL;DR:"
    )
    assert pair["chosen"] == " City library now lends drills, ladders and garden tools for a week with a library card."


@pytest.mark.parametrize(
    ("info", "field"),
    [
        ({"post": "p", "title": "t", "subreddit": None}, "info.subreddit"),
        ({"post": None, "article": None}, "info.post"),
    ],
)
def test_prompts_need_a_post_with_subreddit_and_title_or_an_article(info, field):
    with pytest.raises(BadRow) as e:
        tldr_prompt(info)
    assert (e.value.rejection.reason, e.value.rejection.field) == ("missing_field", field)


def test_axis_pairs_every_two_distinct_summaries_of_a_post_with_different_mean_ratings():
    rows = [RawRow(f"axis:{i}", value) for i, value in enumerate(_rows(AXIS), start=1)]
    out = list(axis_rows_to_pairs(rows))
    summary = [(r.location, r.rejection.reason if r.rejection else "pair") for r in out]
    assert summary == [
        ("axis:9", "missing_rating"),  # rejected while reading; the rest is post by post
        ("axis:1 vs axis:3", "pair"),  # basil: summary 1 mean (6 + 4) / 2 = 5 > 3
        ("axis:1 vs axis:4", "tied_rating"),  # 5 == 5
        ("axis:3 vs axis:4", "pair"),  # 3 < 5: the later summary is chosen
        ("axis:5", "single_summary"),  # brakes: two workers rated the same single summary
        ("axis:7 vs axis:8", "pair"),  # news article: 7 > 2
    ]
    assert out[1].value == {
        "prompt": PLANT_PROMPT,
        "chosen": " Overwatered basil has yellow, droopy leaves; can it recover?",
        "rejected": " Basil.",
    }
    assert (out[3].value["chosen"], out[3].value["rejected"]) == (
        " My basil is yellow after too much water, is it savable?",
        " Basil.",
    )
    assert out[5].value["prompt"].startswith("ARTICLE: Heavy rain flooded")


# --------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------


def test_comparisons_file_report_counts_every_bad_row_by_reason_with_its_first_line(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(COMPARISONS))
    assert dm.hub_dataset is None
    dm.setup("fit")
    report = dm.report["train"]
    assert (report.rows_read, report.rows_kept) == (6, 3)
    assert report.counts == {"empty_response": 1, "identical_responses": 1, "bad_choice": 1}
    assert {reason: issue.location for reason, issue in report.first.items()} == {
        "empty_response": f"{COMPARISONS}:4",
        "identical_responses": f"{COMPARISONS}:5",
        "bad_choice": f"{COMPARISONS}:6",
    }
    assert f"{COMPARISONS}:6 field 'choice': expected 0 or 1, got 2" in report.summary()


def test_plain_text_labels_are_the_summary_plus_eos(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(COMPARISONS))
    dm.setup("fit")
    features = dm.datasets["train"][0]
    prompt_ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(BIKE_PROMPT, add_special_tokens=False).input_ids]
    for side, text in (
        ("chosen", comparison_to_pair(_rows(COMPARISONS)[0])["chosen"]),
        ("rejected", " I bought a bike."),
    ):
        ids, labels = features[f"{side}_input_ids"], features[f"{side}_labels"]
        n_prompt = labels.count(IGNORE_INDEX)
        assert ids[:n_prompt] == prompt_ids[:n_prompt] and labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert tiny_tokenizer.decode(ids[:n_prompt]) == "<s>" + BIKE_PROMPT  # no chat template by default
        assert tiny_tokenizer.decode(labels[n_prompt:]) == text + "</s>"
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tiny_tokenizer.eos_token_id


def test_use_chat_template_or_system_prompt_wraps_the_pair_in_the_template(tiny_tokenizer):
    for options, head in (
        ({"use_chat_template": True}, "<s><|user|>\nSUBREDDIT: r/bicycling"),
        ({"system_prompt": ""}, "<s><|system|>\n</s><|user|>\nSUBREDDIT: r/bicycling"),
    ):
        dm = _datamodule(tiny_tokenizer, train_file=str(COMPARISONS), **options)
        dm.setup("fit")
        features = dm.datasets["train"][0]
        n_prompt = features["chosen_labels"].count(IGNORE_INDEX)
        prompt = tiny_tokenizer.decode(features["chosen_input_ids"][:n_prompt])
        assert prompt.startswith(head) and prompt.endswith("TL;DR:</s><|assistant|>\n")


def test_local_folder_in_the_parquet_export_layout_loads_both_subsets(tiny_tokenizer):
    comparisons = _datamodule(tiny_tokenizer, hub_dataset=str(HUB))
    assert comparisons.hub_kwargs == {"data_dir": "comparisons"}  # no parquet revision for a local folder
    comparisons.prepare_data()
    comparisons.setup("fit")
    assert comparisons.report["train"].source == f"{HUB}[train]" and comparisons.report["train"].rows_kept == 3
    assert comparisons.report["train"].first["bad_choice"].location == f"{HUB}[train]#5"
    assert len(comparisons.datasets["val"]) == 2 and comparisons.report["val"].source == f"{HUB}[validation]"
    axis = _datamodule(tiny_tokenizer, hub_dataset=str(HUB), subset="axis", train_split="validation", val_split="test")
    axis.setup("fit")
    report = axis.report["train"]
    assert (report.rows_read, report.rows_kept) == (6, 3)
    assert report.counts == {"missing_rating": 1, "tied_rating": 1, "single_summary": 1}
    assert report.first["tied_rating"].location == f"{HUB}[validation]#0 vs {HUB}[validation]#3"
    assert len(axis.datasets["val"]) == 1


def test_axis_from_a_file_names_the_first_row_of_each_reason(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, subset="axis", train_file=str(AXIS))
    dm.setup("fit")
    first = {reason: issue.location for reason, issue in dm.report["train"].first.items()}
    assert first == {
        "missing_rating": f"{AXIS}:9",
        "tied_rating": f"{AXIS}:1 vs {AXIS}:4",
        "single_summary": f"{AXIS}:5",
    }


def test_parquet_files_with_nested_columns_convert_like_jsonl(tiny_tokenizer, tmp_path):
    root = tmp_path / "summarize_from_feedback"
    for path in (COMPARISONS, HUB / "comparisons" / "validation" / "0000.jsonl"):
        target = root / path.relative_to(HUB).with_suffix(".parquet")
        target.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(_rows(path)), target)
    from_parquet = _datamodule(tiny_tokenizer, hub_dataset=str(root))
    from_parquet.setup("fit")
    from_file = _datamodule(tiny_tokenizer, train_file=str(COMPARISONS))
    from_file.setup("fit")
    assert from_parquet.datasets["train"] == from_file.datasets["train"]
    assert from_parquet.report["train"].counts == from_file.report["train"].counts


def test_hub_defaults_read_the_parquet_export_of_the_chosen_subset():
    dm = TLDRDataModule()
    assert dm.hub_dataset == TLDR_HUB_ID and (dm.train_split, dm.val_split) == ("train", "validation")
    assert dm.hub_kwargs == {"revision": "refs/convert/parquet", "data_dir": "comparisons"}
    dm = TLDRDataModule(subset="axis", train_split="validation", val_split="test", hub_kwargs={"cache_dir": "c"})
    assert dm.hub_kwargs == {"revision": "refs/convert/parquet", "data_dir": "axis", "cache_dir": "c"}


def test_axis_with_the_comparisons_splits_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"axis subset of openai/summarize_from_feedback has the splits validation, test"
    ):
        TLDRDataModule(subset="axis")
    with pytest.raises(ValueError, match=r"data.subset='pairs'"):
        TLDRDataModule(subset="pairs")


def test_yaml_class_path_sees_the_parent_options():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = {
        "class_path": "sparsepo_lightning.tasks.tldr.TLDRDataModule",
        "init_args": {"subset": "axis", "train_split": "validation", "val_split": "test", "max_length": 640},
    }
    dm = parser.instantiate(parser.parse_args([f"--data={json.dumps(config)}"])).data
    assert isinstance(dm, TLDRDataModule) and (dm.subset, dm.max_length) == ("axis", 640)


def test_shipped_sample_loads_without_rejections(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(SAMPLES), max_length=512, max_prompt_length=384)
    dm.setup("fit")
    assert dm.report["train"].rows_rejected == 0 and dm.report["val"].rows_rejected == 0
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) >= 30
    axis = _datamodule(
        tiny_tokenizer,
        hub_dataset=str(SAMPLES),
        subset="axis",
        train_split="validation",
        val_split="test",
        max_length=512,
        max_prompt_length=384,
    )
    axis.setup("fit")
    assert len(axis.datasets["train"]) >= 5 and len(axis.datasets["val"]) >= 1
