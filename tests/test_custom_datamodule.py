"""Custom DataModules (docs/custom-datamodule.md): the guide's example trains from a composed config, and the data
inputs of an earlier config do not flow into a class chosen later (``sparsepo_lightning/data_inputs.py``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sparsepo_lightning.data.readers import iter_file
from sparsepo_lightning.data.validate import validate_rows
from sparsepo_lightning.data_inputs import settle

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "custom_datamodule"


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


@pytest.fixture
def recipe(tmp_path) -> Path:
    _write(tmp_path, "recipe.yaml", "data:\n  class_path: sparsepo_lightning.data.PreferenceDataModule\n  init_args:\n"
                                    "    train_file: a.jsonl\n    val_file: b.jsonl\n    prompt_field: q\n"
                                    "    max_length: 64\n")
    return tmp_path


def test_a_changed_class_path_resets_the_earlier_inputs_and_keeps_the_rest(recipe):
    _write(recipe, "mine.yaml", "data:\n  class_path: sparsepo_lightning.tasks.hh.HHDataModule\n  init_args:\n"
                                "    train_file: mine.jsonl\n")
    extra, notes = settle(["fit", "--config", "recipe.yaml", "--config", "mine.yaml"], str(recipe))
    assert extra == ["--data.init_args.val_file=null", "--data.init_args.prompt_field=prompt"]  # not max_length
    assert len(notes) == 1 and "mine.yaml changes data.class_path to sparsepo_lightning.tasks.hh.HHDataModule" \
        in notes[0] and "val_file, prompt_field reset to HHDataModule's defaults" in notes[0]
    # given again after the class change (file or command line): kept
    assert settle(["fit", "-c", "recipe.yaml", "--config=mine.yaml", "--data.val_file", "c.jsonl",
                   "--data.init_args.prompt_field=q"], str(recipe)) == ([], [])
    # the class changed on the command line; the same class again is no change
    hh = "sparsepo_lightning.tasks.hh.HHDataModule"
    extra, _ = settle(["fit", "--config", "recipe.yaml", "--data.class_path", hh], str(recipe))
    assert extra == ["--data.init_args.train_file=null", "--data.init_args.val_file=null",
                     "--data.init_args.prompt_field=prompt"]
    same = ["fit", "--config", "recipe.yaml", "--data", "sparsepo_lightning.data.PreferenceDataModule"]
    assert settle(same, str(recipe)) == ([], [])
    assert settle(["fit", "--config", "recipe.yaml", "--data.class_path", "nowhere.Missing"], str(recipe)) == ([], [])


def test_a_later_val_fraction_wins_over_an_earlier_validation_source(recipe):
    extra, notes = settle(["fit", "--config", "recipe.yaml", "--data.val_fraction", "0.1"], str(recipe))
    assert extra == ["--data.init_args.val_file=null"]
    assert notes == ["data: val_fraction=0.1 (--data.val_fraction) holds out part of train for validation, so the "
                     "earlier val_file is not used."]
    # a hub dataset's default val_split gives way too; val_fraction 0 changes nothing
    _write(recipe, "hub.yaml", "data:\n  hub_dataset: org/name\n  train_file: null\n  val_file: null\n")
    extra, _ = settle(["fit", "--config", "recipe.yaml", "--config", "hub.yaml", "--data.val_fraction=0.2"],
                      str(recipe))
    assert extra == ["--data.init_args.val_split=null"]
    assert settle(["fit", "--config", "recipe.yaml", "--data.val_fraction", "0"], str(recipe)) == ([], [])
    # both in the same source stay a conflict for the data module to report
    _write(recipe, "both.yaml", "data:\n  val_file: v.jsonl\n  val_fraction: 0.1\n")
    assert settle(["fit", "--config", "recipe.yaml", "--config", "both.yaml"], str(recipe)) == ([], [])


def test_the_guide_converter_counts_refused_threads():
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        from forum_pairs import ForumPairs
    finally:
        sys.path.remove(str(EXAMPLE))
    module = ForumPairs(min_vote_gap=2)
    rows = module.convert_rows(iter_file(str(EXAMPLE / "train.jsonl")), "train")
    pairs, report = validate_rows(rows, module.fields, source="train.jsonl", strict=False)
    assert (report.rows_read, report.rows_kept, report.counts) == (12, 10, {"too_few_answers": 1, "tied_votes": 1})
    assert report.first["tied_votes"].location.endswith("train.jsonl:10")
    assert pairs[0].prompt == "How do I sort a list in Python?" and pairs[0].rejected.startswith("Write it yourself")


def test_the_guide_example_trains_composed_after_a_recipe(cli_zygote, tiny_model_dir, tmp_path):
    """The command of docs/custom-datamodule.md: the recipe's val_file is dropped with a note, val_fraction holds
    out 2 of the 10 valid threads, and one optimizer step runs. The page's listings are lines of the files run."""
    page = (ROOT / "docs" / "custom-datamodule.md").read_text()
    listings = re.findall(r"tested by: tests/test_custom_datamodule.py::\w+ -->\n```(\w+)\n(.*?)```", page, re.S)
    files = {"python": EXAMPLE / "forum_pairs.py", "yaml": EXAMPLE / "forum.yaml", "bash": None}
    assert sorted(kind for kind, _ in listings) == ["bash", "python", "yaml"]
    for kind, listing in listings:
        if files[kind] is not None:
            lines = files[kind].read_text().splitlines()
            assert all(line in lines for line in listing.splitlines() if line.strip()), kind
    done = cli_zygote.run(
        "fit", "--config", "configs/debug/tiny.yaml", "--config", "docs/examples/custom_datamodule/forum.yaml",
        "--model.model", tiny_model_dir, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        env={"PYTHONPATH": os.pathsep.join([str(ROOT), "docs/examples/custom_datamodule"])})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "changes data.class_path to forum_pairs.ForumPairs" in output and "val_file reset" in output
    assert "kept 0 of" not in output
    assert "skipped 2 bad rows" in output and "1 x too_few_answers" in output, output[-4000:]
    assert "(val_fraction=0.2 hold-out)" in output, output[-4000:]
