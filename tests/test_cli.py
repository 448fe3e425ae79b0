"""The CLI: every shipped YAML parses, values are linked once, and a real `sparsepo fit` runs and logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparsepo_lightning.cli import run as main

ROOT = Path(__file__).resolve().parents[1]
STUDY_PLANS = "configs/study/"
"""Study plans, not `sparsepo fit` configs: tests/test_study_plan.py parses every one with the plan reader."""
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if not str(p.relative_to(ROOT)).startswith(STUDY_PLANS))
PRESETS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "callbacks").rglob("*.yaml"))


def test_configs_exist():
    assert "configs/quickstart.yaml" in CONFIGS and "configs/debug/tiny.yaml" in CONFIGS


COMPOSABLE = ("configs/distributed/", "configs/methods/", "configs/sparsity/", "callbacks/")
"""Second-config presets: parsed on top of a task recipe, as their headers say to use them."""


@pytest.mark.parametrize("config", CONFIGS + PRESETS)
def test_every_shipped_yaml_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = ["--config", "configs/hh/sparsepo_common.yaml"] if config.startswith(COMPOSABLE) else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_unknown_key_is_an_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", "--model.objective.init_args.betta", "0.1",
              "--print_config"])
    assert exit_info.value.code != 0
    assert "betta" in capsys.readouterr().err


def test_fit_from_cli_links_tokenizer_and_writes_tensorboard(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir,
                "--data.train_file", pairs_file, "--data.val_file", pairs_file,
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2"])
    assert cli.datamodule.tokenizer_name == tiny_model_dir  # linked from model.model, given once
    log_dir = Path(cli.trainer.logger.log_dir)
    events = EventAccumulator(str(log_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train_step/loss", "train_step/logit", "train_step/rewards/margin", "train_step/rewards/accuracy",
                "train_step/kl/seq_chosen", "train_step/kl/masked_chosen", "train_step/masks/sparsity_reward_chosen",
                "train_step/masks/l1_reward_chosen", "val_epoch/loss", "lr-AdamW/policy"):
        assert tag in tags, f"{tag} missing from TensorBoard; got {sorted(tags)}"
    # one series per quantity: the module's per-batch values stay out of the logger (the progress bar keeps them)
    assert not [tag for tag in tags if tag.split("/")[0] in ("train", "val") and "nonfinite" not in tag]
    assert "train/loss" in cli.trainer.callback_metrics and "val/rewards/accuracy" in cli.trainer.callback_metrics
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "no checkpoint written"


def test_debug_config_runs_as_shipped(tmp_path, monkeypatch):
    """configs/debug/tiny.yaml unchanged (tiny-random-llama alias with the SmolLM2 tokenizer, shipped pairs)."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs")])
    assert cli.trainer.global_step == 4
    assert cli.model.policy.config.num_hidden_layers == 2 and cli.model.policy.config.vocab_size == 49152
    assert "val/loss" in cli.trainer.callback_metrics


def test_model_tokenizer_name_overrides_the_linked_tokenizer(tiny_model_dir, monkeypatch):
    from sparsepo_lightning.cli import SparsePOCLI
    from sparsepo_lightning.data import PreferenceDataModule
    from sparsepo_lightning.module import PreferenceModule

    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir, "--model.tokenizer_name",
            "some/tokenizer"]
    cli = SparsePOCLI(PreferenceModule, PreferenceDataModule, subclass_mode_data=True, args=args, run=False)
    assert cli.datamodule.tokenizer_name == "some/tokenizer"


def test_recipes_match_their_generator():
    """configs/<task>/*.yaml are written by configs/generate.py; a hand edit or a stale table fails here."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "configs" / "generate.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    for task in ("imdb", "hh", "tldr", "code"):
        for variant in ("dpo", "tdpo1", "tdpo2", "mapo", "sparsepo_common", "sparsepo_indep", "sparsepo_small"):
            assert f"configs/{task}/{variant}.yaml" in CONFIGS


SMALL_RECIPES = [c for c in CONFIGS if c.endswith("_small.yaml")]


@pytest.mark.parametrize("config", SMALL_RECIPES)
def test_small_recipe_fits_offline_on_smollm2(config, tmp_path, monkeypatch):
    """Each task's offline recipe as shipped (SmolLM2, data/samples/<task>), shortened to 2 steps."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", config, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])  # a SmolLM2 checkpoint: 1.6 GB
    assert cli.trainer.global_step == 2
    report = cli.datamodule.report["train"]
    assert report.rows_kept >= 10, report.summary()
    assert {"train/loss", "val/loss", "train/masks/sparsity_reward_chosen"} <= set(cli.trainer.callback_metrics)
