"""`sparsepo` as a user meets it: run as a subprocess, judged by exit status and what it prints.

Help that describes this tool; user errors as one message with the place and the fix (status 2, no traceback;
``--debug`` shows it); checks that run before any model loads (the model named in these runs does not exist, so
an error about anything else proves the model was never loaded); a misspelt key named with its file and a "did you
mean"; one place for the optimizer; an accurate resume line; no Lightning advertisement; a step-counting progress
bar; and evaluation plots labelled by run and step with the reference as the KL = 0 anchor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsepo_lightning.evaluate import COMMANDS as EVALUATE_COMMANDS
from tests.cli_zygote import CliZygote, cli_environment

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/nonexistent/sparsepo-model-that-is-never-loaded"
TINY = ["fit", "--config", "configs/debug/tiny.yaml"]


_ZYGOTE: CliZygote | None = None


@pytest.fixture(scope="module", autouse=True)
def _zygote(cli_zygote):
    """``sparsepo(...)`` below forks from the worker's ``cli_zygote`` (autouse: set before ``first_run``)."""
    global _ZYGOTE
    _ZYGOTE = cli_zygote


def sparsepo(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m sparsepo_lightning.cli *args`` in its own process (forked from the ``cli_zygote`` fixture's)."""
    return _ZYGOTE.run(*args, env=env, timeout=timeout)


def _user_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for phrase in phrases:
        assert phrase in done.stderr, (phrase, done.stderr[-3000:])
    assert NO_MODEL not in done.stderr  # the model was never loaded


HELP_SCREENS = (("--help",), ("evaluate", "--help"), *(("evaluate", name, "--help") for name in EVALUATE_COMMANDS),
                ("export", "--help"))
"""The help screens printed without importing model code (one interpreter prints them all, see `help_screens`)."""
HEAVY = ("torch", "transformers", "lightning", "datasets", "matplotlib")


@pytest.fixture(scope="module")
def help_screens() -> tuple[dict[tuple[str, ...], tuple[int, str]], list[str]]:
    """Each of `HELP_SCREENS` run by the console script's module itself (not forked: a fresh interpreter, one for
    all), as ``{command line: (exit status, stdout)}``, and the `HEAVY` modules imported once all were printed."""
    probe = ("import contextlib, io, json, runpy, sys\n"
             "screens = []\n"
             "for args in json.loads(sys.argv[1]):\n"
             "    sys.argv, status, out = ['sparsepo', *args], 0, io.StringIO()\n"
             "    with contextlib.redirect_stdout(out):\n"
             "        try:\n"
             "            runpy.run_module('sparsepo_lightning', run_name='__main__')\n"
             "        except SystemExit as e:\n"
             "            status = e.code\n"
             "    screens.append([args, status, out.getvalue()])\n"
             f"print(json.dumps([screens, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(HELP_SCREENS)], cwd=ROOT, env=cli_environment(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    screens, heavy = json.loads(done.stdout)
    return {tuple(args): (status, text) for args, status, text in screens}, heavy


def test_help_describes_this_tool(help_screens):
    """``sparsepo --help``: the commands, nothing of Lightning's, and neither torch nor Lightning imported to say it."""
    screens, heavy = help_screens
    status, text = screens["--help",]
    assert status == 0 and heavy == []
    assert "usage: sparsepo" in text and "Preference alignment" in text
    for command in ("fit", "validate", "test", "evaluate", "export", "study"):
        assert f"\n    {command} " in text, command
    assert "predict" not in text and "Lightning Trainer command line tool" not in text
    refused = sparsepo("predict")
    assert refused.returncode == 2 and "invalid choice: 'predict'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_evaluate_and_export_help_import_no_model_code(help_screens):
    """``sparsepo evaluate --help``, ``sparsepo evaluate <command> --help`` (each command) and ``sparsepo export
    --help`` print every option with its default and choices, as plain text (no reST markup), without importing
    torch, transformers, Lightning, datasets or matplotlib (which take several seconds)."""
    screens, heavy = help_screens
    assert heavy == []
    status, text = screens["evaluate", "--help"]
    assert status == 0 and text.startswith("usage: sparsepo evaluate [-h] {" + ",".join(EVALUATE_COMMANDS) + "}")
    for name, module in EVALUATE_COMMANDS.items():
        assert f"\n    {name} " in text and module.HELP in " ".join(text.split()), name
        status, command_text = screens["evaluate", name, "--help"]
        assert status == 0 and command_text.startswith(f"usage: sparsepo evaluate {name} "), name
        assert f"`sparsepo evaluate {name}`:" in command_text and "--out OUT" in command_text
        assert "--chat-template {none,model,zephyr}" in command_text  # the built-in templates, by name
        assert "``" not in command_text and ":class:" not in command_text and len(command_text) > 2000
    assert "(default: google-research-datasets/mbpp)" in " ".join(screens["evaluate", "code", "--help"][1].split())
    status, text = screens["export", "--help"]
    assert status == 0 and text.startswith("usage: sparsepo export ") and "--lora {merged,adapter}" in text
    assert "masks.safetensors" in text and "``" not in text and ":class:" not in text


def test_fit_help_lists_the_task_loaders_and_one_optimizer():
    """Also: the project's own options come first (model, data, --ckpt_path; Lightning's trainer group last), the
    usage names the groups, and no reST markup shows."""
    done = sparsepo("fit", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    places = [text.index(f"\n  --{option}") for option in ("model.model", "data.", "ckpt_path", "trainer.max_steps")]
    assert places == sorted(places), places
    assert len(text.split("\n\n")[0].splitlines()) == 2 and "[--trainer.* ...]" in text.split("\n\n")[0]
    assert "``" not in text and ":class:" not in text
    for loader in ("HHDataModule", "IMDBDataModule", "TLDRDataModule", "CodeDataModule"):
        assert loader in done.stdout, loader
    assert "--model.optimizer" in done.stdout
    assert "\n  --optimizer" not in done.stdout and "--lr_scheduler" not in done.stdout


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\nnot json\n')
    return str(path)


@pytest.mark.parametrize(("args", "phrases"), [
    (["--data.train_file", "missing.jsonl"], ["data.train_file", "'missing.jsonl' does not exist", "Fix:"]),
    (["--data.train_file", "BAD"], ["data.train_file: no valid preference pair", "bad.jsonl:2", "bad.jsonl:1",
                                    "Fix:"]),
    (["--model.objective", "sparsepo_lightning.objectives.DPO"],
     ["masker=LearnedMasker has no effect with objective DPO", "Remove `masker`"]),
    (["--ckpt_path", "missing.ckpt"], ["--ckpt_path missing.ckpt: no such file", "--ckpt_path last"]),
    (["--ckpt_path", "last", "--trainer.logger.init_args.save_dir", "TMP"],
     ["--ckpt_path last: no last checkpoint at", "Fix:"]),
    (["--model.warmup_ratio", "1.5"], ["model.warmup_ratio=1.5: must be in [0, 1)"]),
    (["--trainer.logger.init_args.save_dir", "FILE"], ["is not a writable folder", "Fix:"]),
    (["--model.masker", "sparsepo_lightning.masks.RandomMasker", "--model.masker.init_args.keep_rate", "1.5"],
     ["sparsepo_lightning.masks.RandomMasker refused its arguments: RandomMasker: keep_rate must be in (0, 1], got "
      "1.5.", "its init_args (model.masker, chosen on the command line)"]),
    (["--data.class_path", "sparsepo_lightning.data.HHDataModule"],
     ["data: cannot use class_path 'sparsepo_lightning.data.HHDataModule' (module 'sparsepo_lightning.data' has no "
      "attribute 'HHDataModule'). Did you mean 'sparsepo_lightning.tasks.hh.HHDataModule'?"]),
    (["--model.masker", "my_weights.LowReferenceProbability"],
     ["model.masker: cannot use class_path 'my_weights.LowReferenceProbability' (No module named 'my_weights')",
      "must be importable", "PYTHONPATH"]),
], ids=["missing-data", "only-bad-rows", "masker-objective", "missing-ckpt", "last-resolves-nothing", "option",
        "log-folder", "plugin-argument", "class-path-did-you-mean", "class-path-not-importable"])
def test_user_errors_are_one_message_before_any_model_loads(args, phrases, bad_rows, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    places = {"BAD": bad_rows, "TMP": str(tmp_path / "runs"), "FILE": str(tmp_path / "a-file" / "runs")}
    args = [places.get(a, a) for a in args]
    _user_error(sparsepo(*TINY, "--model.model", NO_MODEL, *args), *phrases)


def test_an_occupied_checkpoint_folder_fails_before_any_model_loads(tmp_path):
    occupied = tmp_path / "ckpts"
    occupied.mkdir()
    (occupied / "last.ckpt").write_text("another run's checkpoint")
    config = tmp_path / "ckpt.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: sparsepo_lightning.checkpointing.RunCheckpoint\n"
                      f"      init_args: {{dirpath: {json.dumps(str(occupied))}}}\n")
    _user_error(sparsepo(*TINY, "--config", str(config), "--model.model", NO_MODEL),
                f"checkpoint directory {occupied}", "last.ckpt", "Fix:")
    assert (occupied / "last.ckpt").read_text() == "another run's checkpoint"


def test_last_pointing_at_a_deleted_checkpoint_is_named(tmp_path):
    checkpoints = tmp_path / "runs" / "debug" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=200.ckpt")  # its target is gone
    _user_error(sparsepo(*TINY, "--model.model", NO_MODEL, "--ckpt_path", "last",
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")),
                "--ckpt_path last: no last checkpoint at", f"broken links: {checkpoints / 'last.ckpt'}", "Fix:")


def test_export_errors_are_one_message(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    done = sparsepo("export", str(tmp_path / "any.ckpt"), str(occupied))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{occupied} already exists and is not an empty folder" in done.stderr and "Fix:" in done.stderr
    done = sparsepo("export", str(tmp_path / "missing.ckpt"), str(tmp_path / "new"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "missing.ckpt' does not exist" in done.stderr


def test_evaluate_option_errors_are_one_message(tmp_path):
    done = sparsepo("evaluate", "sentiment", "--policies", "a-model", "another-model", "--labels", "one",
                    "--prompts", str(ROOT / "data/samples/imdb/imdb-sft-test.jsonl"), "--out", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--labels: got 1 names for 2 --policies; give one each." in done.stderr


@pytest.mark.parametrize("switch", ["flag", "env"])
def test_debug_shows_the_traceback(switch):
    args, env = (["--debug"], None) if switch == "flag" else ([], {"SPARSEPO_DEBUG": "1"})
    done = sparsepo(*TINY, "--model.model", NO_MODEL, "--data.train_file", "missing.jsonl", *args, env=env)
    assert done.returncode != 0 and "Traceback" in done.stderr and "MissingFileError" in done.stderr


def test_internal_errors_keep_their_traceback(tiny_model_dir, tmp_path):
    config = tmp_path / "boom.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tests.crash_helpers.InternalError\n")
    done = sparsepo(*TINY, "--config", str(config), "--model.model", tiny_model_dir,
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: an internal error" in done.stderr


def test_misspelt_yaml_keys_name_the_file_line_and_the_likely_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  accelerator: cpu\n  max_stepz: 3\n")
    _user_error(sparsepo(*TINY, "--config", str(typo), "--model.model", NO_MODEL),
                f"unknown key trainer.max_stepz in {typo}:3", "Did you mean 'trainer.max_steps'?")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  objective:\n    init_args:\n      betta: 0.1\n")
    _user_error(sparsepo(*TINY, "--config", str(nested), "--model.model", NO_MODEL),
                f"in {nested}:4", "not a parameter of sparsepo_lightning.objectives.SparsePO",
                "Did you mean 'model.objective.init_args.beta'?")
    _user_error(sparsepo(*TINY, "--trainer.max_stepz", "3", "--model.model", NO_MODEL),
                "unknown option --trainer.max_stepz on the command line", "Did you mean 'trainer.max_steps'?")
    renamed = tmp_path / "renamed.yaml"  # a config written before the two checkpointing options became one
    renamed.write_text("model:\n  gradient_checkpointing: true\n")
    _user_error(sparsepo(*TINY, "--config", str(renamed), "--model.model", NO_MODEL),
                f"unknown key model.gradient_checkpointing in {renamed}:2", "now 'model.activation_checkpointing'",
                f"Fix: rename it to 'activation_checkpointing' in {renamed}:2.")
    relative = os.path.relpath(typo, ROOT)  # jsonargparse reads a config file from inside its folder
    _user_error(sparsepo(*TINY, "--config", relative, "--model.model", NO_MODEL), f"in {relative}:3")


def test_broken_yaml_names_its_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1\n")
    _user_error(sparsepo(*TINY, "--config", str(broken), "--model.model", NO_MODEL),
                f"in {broken}, line 2", f"Fix: correct the YAML syntax of {broken}.")


def test_top_level_optimizer_is_refused_with_the_fix():
    _user_error(sparsepo(*TINY, "--optimizer", "SGD", "--optimizer.lr", "0.5", "--model.model", NO_MODEL),
                "unknown option --optimizer", "--model.optimizer", "mask")


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """3 steps of the tiny config on 16 pairs (8 batches per epoch): bounded by max_steps, ends mid-epoch."""
    runs = tmp_path_factory.mktemp("cli-runs")
    done = sparsepo(*TINY, "--model.model", tiny_model_dir, "--data.train_file", pairs_file, "--data.val_file",
                    pairs_file, "--trainer.max_steps", "3", "--trainer.logger.init_args.save_dir", str(runs))
    assert done.returncode == 0, done.stderr[-4000:]
    return runs, done


def test_console_shows_steps_of_the_real_total_and_no_advertisement(first_run):
    _, done = first_run
    output = done.stdout + done.stderr
    assert "litlogger" not in output and "Tip:" not in output
    assert "Epoch 0/-2" not in output and "\r" not in done.stdout  # not a terminal: plain lines, no redrawn bar
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/3 (33%) | loss ") and lines[-1].startswith("step 3/3 (100%) | loss "), lines
    for label in ("accuracy ", "margin ", "mask zeros ", " s/step | ETA "):
        assert label in lines[-1], (label, lines)


def test_resume_says_what_resumes_exactly(first_run, tiny_model_dir, pairs_file):
    runs, _ = first_run
    done = sparsepo(*TINY, "--model.model", tiny_model_dir, "--data.train_file", pairs_file, "--data.val_file",
                    pairs_file, "--trainer.max_steps", "5", "--trainer.logger.init_args.save_dir", str(runs),
                    "--ckpt_path", "last", "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    output = done.stdout + done.stderr
    assert "not resumable" not in output
    assert "Resuming at step 3: weights, masks, optimizer, learning-rate schedule and loop counters are restored; " \
           "mid-epoch, after 3 batches of pass 1; the pass continues with the next batch" in output


def test_sentiment_plot_labels_runs_by_step_and_anchors_the_reference(first_run, tiny_model_dir, tmp_path):
    runs, _ = first_run
    last = runs / "debug" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    done = sparsepo("evaluate", "sentiment", "--policies", str(last), "--prompts",
                    str(ROOT / "data/samples/imdb/imdb-sft-test.jsonl"), "--num-prompts", "2", "--num-samples", "2",
                    "--max-new-tokens", "4", "--out", str(out), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "sentiment.json").read_text())
    (policy,) = summary["results"]
    assert policy["label"] == "debug/version_0 @ step 3"
    (anchor,) = summary["references"]
    assert anchor["policy"] == tiny_model_dir and anchor["kl_mean"] == 0.0 and anchor["num_samples"] == 4
    assert (out / "sentiment.png").is_file()
