"""IMDB task: review-prefix prompts, ODPO sample files -> pairs, classifier scorer, builder CLI (all offline)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from sparsepo_lightning.builders import sentiment
from sparsepo_lightning.builders.scorers import ClassifierScorer, VaderScorer, make_scorer, positive_index
from sparsepo_lightning.builders.sentiment import skipped_path
from sparsepo_lightning.data.pairing import SKIP_EMPTY, SKIP_TIED, pair_samples
from sparsepo_lightning.data.readers import iter_jsonl
from sparsepo_lightning.data.rows import FieldNames
from sparsepo_lightning.data.validate import validate_rows
from sparsepo_lightning.tasks.imdb import IMDBDataModule, join_continuation
from sparsepo_lightning.tasks.imdb_prompts import clean_review, imdb_prompts, prefixes, review_prefix

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
IMDB_HUB = str(FIXTURES / "hub" / "imdb")
ODPO_FILE = FIXTURES / "odpo" / "imdb-sft-test.jsonl"
SAMPLES = Path(__file__).parents[1] / "data" / "samples" / "imdb"
TRAIN_REVIEWS = [  # tests/fixtures/hub/imdb/plain_text/train-00000-of-00001.parquet, see make_fixture.py
    "This movie was a complete waste of time.<br /><br />The acting was wooden and the plot made no sense.",
    "Absolutely loved it!<br />The cast was wonderful and the score stayed with me for days.",
    "",
    "It is hard to know where to begin with this sprawling, exhausting epic about three generations. " * 120,
    "This movie was a disaster from start to finish.",
    "<br /><br />Starts with a break and   odd\tspacing,<br/>then more text.",
    "Short.",
]


# Prompts from reviews ----------------------------------------------------------------------------------------


def test_clean_review_replaces_html_breaks_and_collapses_whitespace():
    assert clean_review("a<br />b<br/>c<BR>d <br /><br />  e\tf") == "a b c d e f"
    assert review_prefix("<br /><br />One two<br />three four", 3) == "One two three"
    assert review_prefix("Short.", 8) == "Short."
    assert review_prefix("   <br />  ", 3) == ""


def test_fixed_length_prompts_from_the_hub_layout_fixture_drop_empty_and_duplicates():
    prompts = imdb_prompts(IMDB_HUB, "train", min_words=3, max_words=3)
    # review 2 is empty, review 4 repeats "This movie was"; the very long review gives its first three words
    assert prompts == ["This movie was", "Absolutely loved it!", "It is hard", "Starts with a", "Short."]
    assert imdb_prompts(IMDB_HUB, "unsupervised", min_words=2, max_words=2) == ["Not sure", "An odd"]


def test_random_prompt_lengths_are_seeded_per_review_position():
    rng = random.Random(7)
    expected = []
    for review in TRAIN_REVIEWS:  # naive: the i-th draw cuts the i-th review
        words = review.replace("<br />", " ").replace("<br/>", " ").split()[: rng.randint(2, 8)]
        if words and " ".join(words) not in expected:
            expected.append(" ".join(words))
    assert imdb_prompts(IMDB_HUB, "train", seed=7) == expected
    assert prefixes(TRAIN_REVIEWS, seed=7) == expected
    assert imdb_prompts(IMDB_HUB, "train", seed=8) != expected


def test_num_prompts_is_a_seeded_sample_of_distinct_prompts():
    everything = imdb_prompts(IMDB_HUB, "train", min_words=3, max_words=3)
    sample = imdb_prompts(IMDB_HUB, "train", num_prompts=3, min_words=3, max_words=3, seed=1)
    assert sample == random.Random(1).sample(everything, 3)
    assert sample == imdb_prompts(IMDB_HUB, "train", num_prompts=3, min_words=3, max_words=3, seed=1)
    with pytest.raises(ValueError, match="gives 5 distinct prompts"):
        imdb_prompts(IMDB_HUB, "train", num_prompts=6, min_words=3, max_words=3)
    with pytest.raises(ValueError, match="min_words"):
        prefixes(["a b"], min_words=3, max_words=2)


# Pairing rules --------------------------------------------------------------------------------------------


def test_first_two_pairing_uses_only_the_first_two_samples():
    row, reason = pair_samples("p", [" a", " b", " c"], [0.1, 0.5, 0.9], pairing="first_two")
    assert reason is None and (row["chosen"], row["rejected"], row["chosen_score"]) == (" b", " a", 0.5)
    assert pair_samples("p", [" a", " b", " c"], [0.5, 0.5, 0.9], pairing="first_two") == (None, SKIP_TIED)
    assert pair_samples("p", ["", " b", " c"], [0.1, 0.5, 0.9], pairing="first_two") == (None, SKIP_EMPTY)
    with pytest.raises(ValueError, match="best_worst, first_two"):
        pair_samples("p", [" a", " b"], [0.0, 1.0], pairing="random")


@pytest.mark.parametrize(
    ("prompt", "text", "response"),
    [
        ("I found it real", "moving.", " moving."),  # ODPO texts lost their leading space
        ("I wanted this", ", but no.", ", but no."),  # punctuation attaches to the prompt
        ("I wanted this", "I wanted this to work.", " to work."),  # the whole sampled string: cut the prompt off
        ("Trailing space ", "here.", "here."),
        ("Prompt", " already spaced", " already spaced"),
    ],
)
def test_join_continuation(prompt, text, response):
    assert join_continuation(prompt, text) == response
    assert prompt + join_continuation(prompt, text, separator="") in (prompt + text, text)


# ODPO samples -> pairs through IMDBDataModule ---------------------------------------------------------------


def _odpo_module(tokenizer, pairing: str, **kwargs) -> IMDBDataModule:
    dm = IMDBDataModule(format="odpo", pairing=pairing, train_file=str(ODPO_FILE), max_length=64,
                        max_prompt_length=32, **kwargs)
    dm.tokenizer = tokenizer
    return dm


def _pairs(dm: IMDBDataModule) -> list[tuple[str, str, str, str]]:
    """(line, prompt, chosen, rejected) of the pairs the module makes from the fixture file."""
    pairs, _ = validate_rows(dm.convert_rows(iter_jsonl(ODPO_FILE), "train"), FieldNames(), source="x")
    return [(p.source.rsplit(":", 1)[1], p.prompt, p.chosen, p.rejected) for p in pairs]


def test_odpo_first_two_pairs_and_report(tiny_tokenizer):
    dm = _odpo_module(tiny_tokenizer, "first_two")
    assert _pairs(dm) == [
        ("1", "I found it real", " moving and honest.", " boring and slow."),
        ("3", "This movie is not a", " masterpiece, but I loved it.", " good one. Avoid it."),
        ("11", "Believe me I wanted this", " to be good, and it was.", ", but it was a mess."),
    ]
    dm.setup("fit")
    report = dm.report["train"]
    # one row per prompt group (5) + the unreadable line + the lone malformed sample
    assert (report.rows_read, report.rows_kept, len(dm.datasets["train"])) == (7, 3, 3)
    assert report.counts == {"too_few_samples": 1, "tied_rewards": 1, "bad_json": 1, "wrong_type": 1}
    locations = {reason: issue.location for reason, issue in report.first.items()}
    assert locations == {
        "too_few_samples": f"{ODPO_FILE}:6",
        "tied_rewards": f"{ODPO_FILE}:7",
        "bad_json": f"{ODPO_FILE}:10",
        "wrong_type": f"{ODPO_FILE}:13",
    }
    assert "field 'reward'" in report.first["wrong_type"].message
    assert "the first two of its 3 samples have the same reward" in report.first["tied_rewards"].message


def test_odpo_best_worst_pairs_use_all_samples_of_interleaved_prompts(tiny_tokenizer):
    dm = _odpo_module(tiny_tokenizer, "best_worst")
    assert _pairs(dm) == [
        ("1", "I found it real", " moving and honest.", " dull, sadly."),  # line 4 belongs to line 1's prompt
        ("3", "This movie is not a", " masterpiece, but I loved it.", " good one. Avoid it."),
        ("7", "Tied at the", " finish, a great film.", " start, both the same."),  # min tie -> first sample
        ("11", "Believe me I wanted this", " to be good, and it was.", ", but it was a mess."),
    ]
    dm.setup("fit")
    assert dm.report["train"].counts == {"too_few_samples": 1, "bad_json": 1, "wrong_type": 1}


def test_odpo_sequences_are_prompt_plus_continuation_without_chat_template(tiny_tokenizer):
    dm = _odpo_module(tiny_tokenizer, "first_two", add_bos=False)
    dm.setup("fit")
    first = dm.datasets["train"][0]
    expected = tiny_tokenizer("I found it real moving and honest.", add_special_tokens=False)["input_ids"]
    assert first["chosen_input_ids"] == [*expected, tiny_tokenizer.eos_token_id]


def test_odpo_strict_mode_stops_at_the_first_rejected_group(tiny_tokenizer):
    dm = _odpo_module(tiny_tokenizer, "first_two", strict=True)
    with pytest.raises(ValueError, match=r"imdb-sft-test.jsonl:6 field 'prompt': the prompt 'Lonely prompt' has 1"):
        dm.setup("fit")


def test_pairs_format_reads_builder_rows_unchanged(tiny_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "The film was", "chosen": " great.", "rejected": " bad.", "chosen_score": 0.6,
             "rejected_score": -0.5}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = IMDBDataModule(train_file=str(path), max_length=32, max_prompt_length=16)
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and not dm.use_chat_template


def test_imdb_datamodule_rejects_unknown_options():
    with pytest.raises(ValueError, match="data.format='hh'"):
        IMDBDataModule(format="hh")
    with pytest.raises(ValueError, match="data.pairing='all'"):
        IMDBDataModule(pairing="all")


def test_lightning_cli_parser_sees_parent_options_through_kwargs(tmp_path):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  class_path: sparsepo_lightning.tasks.imdb.IMDBDataModule\n  init_args:\n"
        f"    format: odpo\n    pairing: best_worst\n    train_file: {ODPO_FILE}\n    max_length: 77\n"
        "    max_prompt_length: 33\n"
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    parser.add_argument("--config", action="config")
    dm = parser.instantiate_classes(parser.parse_args(["--config", str(config)])).data
    assert isinstance(dm, IMDBDataModule)
    assert (dm.format, dm.pairing, dm.max_length, dm.max_prompt_length) == ("odpo", "best_worst", 77, 33)
    assert dm.hparams["max_length"] == 77 and dm.hparams["format"] == "odpo"
    with pytest.raises(Exception, match="max_lenght"):
        parser.parse_args(["--data.init_args.max_lenght", "3", "--config", str(config)])


# Shipped samples ----------------------------------------------------------------------------------------


def test_shipped_samples_are_up_to_date_with_their_vader_rewards(tmp_path):
    import runpy

    runpy.run_path(str(SAMPLES / "make_samples.py"))["main"](tmp_path)
    for split in ("train", "test"):
        name = f"imdb-sft-{split}.jsonl"
        assert (tmp_path / name).read_text() == (SAMPLES / name).read_text(), f"rerun {SAMPLES}/make_samples.py"
    vader = VaderScorer()
    rows = [json.loads(line) for line in (SAMPLES / "imdb-sft-test.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == vader([r["text"] for r in rows])


def test_shipped_samples_load_without_rejections(tiny_tokenizer):
    dm = IMDBDataModule(format="odpo", train_file=str(SAMPLES / "imdb-sft-train.jsonl"),
                        val_file=str(SAMPLES / "imdb-sft-test.jsonl"), max_length=64, max_prompt_length=16)
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (24, 8)
    assert dm.report["train"].rows_rejected == dm.report["val"].rows_rejected == 0


# Classifier scorer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A random 1-layer DistilBERT sentiment classifier with labels {0: NEGATIVE, 1: POSITIVE}."""
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, pad_token_id=tiny_tokenizer.pad_token_id,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    path = tmp_path_factory.mktemp("tiny-classifier")
    DistilBertForSequenceClassification(config).eval().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_classifier_scorer_is_the_softmax_probability_of_positive(classifier_dir, tiny_tokenizer):
    texts = ["The movie was great and the actors were wonderful.", "terrible", "", "hello there, how are you?"]
    model = DistilBertForSequenceClassification.from_pretrained(classifier_dir).eval()
    expected = []
    for text in texts:  # naive: one text at a time, no padding, softmax by hand
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
        logits = model(input_ids=ids).logits[0].double()
        expected.append((logits[1].exp() / logits.exp().sum()).item())
    scorer = ClassifierScorer(classifier_dir, batch_size=3)
    assert scorer.positive_index == 1
    torch.testing.assert_close(torch.tensor(scorer(texts)), torch.tensor(expected, dtype=torch.float32), atol=1e-5,
                               rtol=1e-5)
    negative = ClassifierScorer(classifier_dir, positive_label="negative")
    torch.testing.assert_close(torch.tensor(negative(texts)), 1 - torch.tensor(expected, dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)
    assert isinstance(make_scorer(classifier_dir), ClassifierScorer) and isinstance(make_scorer("VADER"), VaderScorer)


def test_positive_label_is_found_from_label_names():
    assert positive_index({0: "NEGATIVE", 1: "POSITIVE"}, None) == 1
    assert positive_index({0: "pos", 1: "neg"}, None) == 0
    assert positive_index({0: "LABEL_0", 1: "LABEL_1"}, None) == 1
    assert positive_index({"0": "a", "1": "b"}, "B") == 1 and positive_index({0: "a", 1: "b"}, 0) == 0
    with pytest.raises(ValueError, match="cannot tell which class is positive"):
        positive_index({0: "joy", 1: "anger", 2: "fear"}, None)
    with pytest.raises(ValueError, match="not a label name"):
        positive_index({0: "NEGATIVE", 1: "POSITIVE"}, "happy")


# Builder CLI on the fixture folder ----------------------------------------------------------------------------


def test_builder_cli_samples_imdb_prompts_scores_with_a_classifier_and_resumes(tiny_model_dir, classifier_dir,
                                                                               tmp_path):
    out = tmp_path / "imdb.jsonl"
    argv = ["--model", tiny_model_dir, "--imdb", IMDB_HUB, "--num-prompts", "4", "--min-words", "3", "--max-words",
            "3", "--prompt-seed", "1", "--scorer", classifier_dir, "--pairing", "first_two", "--num-samples", "3",
            "--max-new-tokens", "4", "--batch-size", "3", "--no-progress", "--out", str(out)]
    report = sentiment.main(argv)
    assert report.written >= 2  # random classifier: continuations are never tied
    prompts = imdb_prompts(IMDB_HUB, "train", num_prompts=4, min_words=3, max_words=3, seed=1)
    assert report.prompts == 4 and report.written + sum(report.skipped.values()) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in prompts if p in {r["prompt"] for r in rows}]
    assert all(0 < r["rejected_score"] < r["chosen_score"] < 1 for r in rows)
    before = out.read_text()
    again = sentiment.main(argv)
    assert (again.already_done, again.written) == (4, 0) and out.read_text() == before

    partial = tmp_path / "partial.jsonl"  # resuming a cut file gives the same rows as the uninterrupted build
    partial.write_text("".join(before.splitlines(keepends=True)[:1]))
    if skipped_path(out).exists():
        shutil.copy(skipped_path(out), skipped_path(partial))
    resumed = sentiment.main([*argv[:-1], str(partial)])
    assert partial.read_text() == before and resumed.already_done >= 1
