"""Run identity: ``--ckpt_path last`` resumes the newest checkpoint of the same experiment, never another run's;
resuming another run's checkpoint is an error naming what differs unless ``--resume_anyway``; a composed config
logs under its own name. Each ``sparsepo`` command is forked from the ``cli_zygote``."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsepo_lightning.run_identity import CHECKPOINT_KEY, differences, identity_hash, identity_settings

TINY = ["fit", "--config", "configs/debug/tiny.yaml"]
CONFPO = ["--config", "configs/methods/confpo.yaml"]


def test_identity_ignores_what_may_change_on_resume():
    config = {"seed_everything": 42, "ckpt_path": "last",
              "trainer": {"max_steps": 4, "devices": 1, "logger": {"init_args": {"save_dir": "runs"}},
                          "precision": "32-true", "val_check_interval": 2},
              "model": {"model": "m", "lr": 1e-3, "objective": {"class_path": "SparsePO", "init_args": {"beta": 0.8}},
                        "gradient_checkpointing": False},
              "data": {"init_args": {"train_file": "t.jsonl", "num_workers": 0}}}
    settings = identity_settings(config)
    assert settings == {"seed_everything": 42, "trainer.precision": "32-true", "model.model": "m", "model.lr": 1e-3,
                        "model.objective.class_path": "SparsePO", "model.objective.init_args.beta": 0.8,
                        "data.init_args.train_file": "t.jsonl"}
    resumed = {**config, "ckpt_path": None, "trainer": {**config["trainer"], "max_steps": 40, "devices": 8},
               "model": {**config["model"], "gradient_checkpointing": True},
               "data": {"init_args": {"train_file": "t.jsonl", "num_workers": 4}}}
    assert identity_hash(identity_settings(resumed)) == identity_hash(settings)
    other = {**config, "model": {**config["model"], "lr": 1e-4}}
    assert identity_hash(identity_settings(other)) != identity_hash(settings)
    assert differences(settings, identity_settings(other)) == "model.lr: 0.001 -> 0.0001"


def _checkpoint(runs: Path, name: str, version: int) -> Path:
    return runs / name / f"version_{version}" / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_resumes_this_run_not_another_one(cli_zygote, tiny_model_dir, pairs_file, tmp_path):
    """Run A (tiny SparsePO) and then run B (ConfPO, forced into the same log folder) write last checkpoints; `last`
    under A's config resumes A (B's is newer) and says so; a changed beta finds only other runs and refuses before
    any model loads; an explicit path of another run is refused naming the setting, unless --resume_anyway."""
    runs, with_bad_row = tmp_path / "runs", tmp_path / "pairs.jsonl"
    with_bad_row.write_text(Path(pairs_file).read_text() + "not json\n")  # one bad row, reported without our source
    common = ["--model.model", tiny_model_dir, "--data.train_file", str(with_bad_row), "--data.val_file", pairs_file,
              "--trainer.logger.init_args.save_dir", str(runs), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    first = cli_zygote.start(*TINY, *common, "--trainer.max_steps", "1")
    named = cli_zygote.run(*TINY, *CONFPO, *common, "--ckpt_path", "last")  # a composed config: its own folder
    assert f"no last checkpoint at {runs}/debug-confpo/version_*/" in named.stderr, named.stderr[-2000:]
    assert first.wait() == 0, first.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(runs / "debug" / "version_0")).Reload()
    events = accumulator.Tags()["scalars"]
    assert "train_step/loss" in events and "hp_metric" not in events  # no `hp_metric -1` placeholder
    _check_dashboard(accumulator, runs / "debug" / "version_0")
    summary = first.stdout + first.stderr  # a 1-step run without validation: an honest, short summary
    assert "data (train): skipped 1 bad row.\n" in first.stderr and "splits.py" not in first.stderr
    assert "  1 optimizer step\n" in summary and "no validation ran" in summary and "validation at step" not in summary
    other = cli_zygote.run(*TINY, *CONFPO, *common, "--trainer.max_steps", "1", "--trainer.logger.init_args.name",
                           "debug")
    assert other.returncode == 0, other.stderr[-3000:]
    a, b = _checkpoint(runs, "debug", 0), _checkpoint(runs, "debug", 1)
    saved = torch.load(a, weights_only=True)[CHECKPOINT_KEY]
    assert saved["settings"]["model.objective.class_path"] == "sparsepo_lightning.objectives.SparsePO"
    assert torch.load(b, weights_only=True)[CHECKPOINT_KEY]["hash"] != saved["hash"]

    resumed = cli_zygote.run(*TINY, *common, "--trainer.max_steps", "2", "--ckpt_path", "last")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert (f"--ckpt_path last: resuming from {a} (step 1), the newest checkpoint of this run (run identity "
            f"{saved['hash']}" in output and f"skipped 1 newer checkpoint(s) of other runs: {b}" in output)
    assert torch.load(_checkpoint(runs, "debug", 2), weights_only=True)["global_step"] == 2

    refused = cli_zygote.run(*TINY, *common, "--model.model", "/never/loaded", "--model.objective.init_args.beta",
                             "0.5", "--ckpt_path", "last")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "belong to other runs, none to this configuration" in refused.stderr
    assert "model.model: " in refused.stderr and "model.objective.init_args.beta: 0.8 -> 0.5" in \
        refused.stderr and "--resume_anyway" in refused.stderr

    explicit = cli_zygote.run(*TINY, *common, "--model.lr", "0.01", "--ckpt_path", str(a))
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr, explicit.stderr[-3000:]
    assert f"--ckpt_path {a} was written by another run" in explicit.stderr
    assert "differs in model.lr: 0.001 -> 0.01. Fix:" in explicit.stderr
    anyway = cli_zygote.run(*TINY, *common, "--model.lr", "0.01", "--ckpt_path", str(a), "--resume_anyway",
                            "--trainer.max_steps", "2")
    assert anyway.returncode == 0, anyway.stderr[-3000:]


def test_fit_help_describes_ckpt_path_as_this_tool_resolves_it(cli_zygote):
    done = cli_zygote.run("fit", "--help", env={"COLUMNS": "400"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'last': the newest runs/<name>/version_*/checkpoints/last*.ckpt written by this same run identity" in \
        done.stdout and "--resume_anyway" in done.stdout


def _check_dashboard(accumulator, log_dir: Path) -> None:
    """The custom-scalars layout is the one of ``dashboard.LAYOUT`` and its charts find the run's tags (mask sparsity
    and margins of the tiny SparsePO run); the logged hyper-parameters have the model's settings and no
    ``_instantiator``."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    from sparsepo_lightning.dashboard import LAYOUT

    layout = layout_pb2.Layout.FromString(accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert [c.title for c in layout.category] == list(LAYOUT) and len(charts) == sum(map(len, LAYOUT.values()))
    tags = accumulator.Tags()["scalars"]
    for title in ("reward-mask zeros (% of response tokens)", "margin", "accuracy", "sequence KL"):
        found = [tag for tag in tags if any(re.search(pattern, tag) for pattern in charts[title])]
        assert found and all(tag.startswith("train") for tag in found), (title, found)
    written = b"".join(path.read_bytes() for path in log_dir.glob("events.out.tfevents.*"))
    assert b"l1_reward" in written and b"_instantiator" not in written  # hyper-parameters, without the internals
