"""BCO end to end on the tiny Llama: 2-step fits on pairs and on unpaired rows (module API and ``sparsepo fit`` with
configs/methods/bco.yaml), δ updated by training steps only, δ in checkpoints and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from sparsepo_lightning.callbacks import RewardStatistics
from sparsepo_lightning.checkpointing import OBJECTIVE_STATE
from sparsepo_lightning.cli import run as main
from sparsepo_lightning.data import PreferenceDataModule, UnpairedDataModule
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import BCO, DPO
from tests.test_module import fit, make_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unpaired_file(pairs_file, tmp_path_factory) -> str:
    """The pairs as 32 unpaired rows: each chosen response desirable, each rejected one undesirable."""
    rows = []
    for line in Path(pairs_file).read_text().splitlines():
        pair = json.loads(line)
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    path = tmp_path_factory.mktemp("unpaired") / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def unpaired_data(model_dir: str, rows: str) -> UnpairedDataModule:
    return UnpairedDataModule(tokenizer=model_dir, train_file=rows, val_file=rows, test_file=rows, batch_size=2,
                              max_length=32, max_prompt_length=16)


class TrainingRewards(Callback):
    """The reward of every row of every training batch (from ``last_step``) and δ after each one."""

    def __init__(self) -> None:
        self.rewards: list[torch.Tensor] = []
        self.deltas: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = pl_module.last_step.out
        paired = pl_module.last_step.batch.desirable is None
        self.rewards.append(torch.cat([out.chosen_reward, out.rejected_reward]) if paired
                            else out.chosen_reward + out.rejected_reward)
        self.deltas.append(float(pl_module.objective.reward_shift.mean))


@pytest.mark.parametrize("layout", ["pairs", "unpaired"])
def test_bco_fits_two_steps_and_delta_is_the_mean_of_the_training_rewards(layout, tiny_model_dir, pairs_file,
                                                                           unpaired_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(model=tiny_model_dir, objective=BCO(), lr=1e-3)
    data = make_data(tiny_model_dir, pairs_file) if layout == "pairs" else unpaired_data(tiny_model_dir, unpaired_file)
    rewards = TrainingRewards()
    trainer, recorder = fit(module, data, tmp_path, val_check_interval=2,
                            callbacks_extra=[rewards, RewardStatistics(log_every_n_steps=1)])
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))
    shift = module.objective.reward_shift
    seen = torch.cat(rewards.rewards)
    assert int(shift.count) == len(seen) == (8 if layout == "pairs" else 4)  # the sanity check and validation add none
    torch.testing.assert_close(shift.mean, seen.mean())
    logged = trainer.callback_metrics
    assert float(logged["val/rewards/delta"]) == pytest.approx(float(shift.mean), abs=1e-6)
    assert float(logged["train/rewards/delta"]) == pytest.approx(rewards.deltas[-1], abs=1e-6)
    side_keys = ("rewards/chosen", "logps/rejected") if layout == "pairs" else (
        "rewards/desirable", "logps/undesirable")
    for key in ("loss", "rewards/margin", "rewards/accuracy", *side_keys):
        assert f"train/{key}" in logged and f"val/{key}" in logged, key
    assert "train_step/rewards/accuracy" in logged and f"train_step/{side_keys[0]}" in logged  # RewardStatistics
    record = module.last_step
    rows = record.batch.input_ids.shape[0]
    assert record.out.loss.shape == ((rows // 2,) if layout == "pairs" else (rows,))


def test_validation_leaves_delta_alone(tiny_model_dir, unpaired_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(model=tiny_model_dir, objective=BCO(), lr=1e-3)
    data = unpaired_data(tiny_model_dir, unpaired_file)
    trainer, _ = fit(module, data, tmp_path, max_steps=1)
    before = module.objective.state_dict()["reward_shift"]
    trainer.validate(module, datamodule=data, verbose=False)
    trainer.test(module, datamodule=data, verbose=False)
    after = module.objective.state_dict()["reward_shift"]
    assert torch.equal(after["mean"], before["mean"]) and int(after["count"]) == int(before["count"]) == 2
    assert module.last_step.stage == "test"


def test_delta_resumes_exactly_from_a_mid_epoch_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    def new_module():
        seed_everything(0)
        return PreferenceModule(model=tiny_model_dir, objective=BCO(beta=0.5), lr=1e-3, warmup_ratio=0.0,
                                schedule="constant")

    full_module = new_module()
    _, full = fit(full_module, make_data(tiny_model_dir, pairs_file), tmp_path / "full", max_steps=4)
    first = new_module()
    trainer, part1 = fit(first, make_data(tiny_model_dir, pairs_file), tmp_path / "a", max_steps=2)
    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    torch.testing.assert_close(saved[OBJECTIVE_STATE]["reward_shift"]["mean"], first.objective.reward_shift.mean)
    assert int(saved[OBJECTIVE_STATE]["reward_shift"]["count"]) == 8

    resumed = new_module()
    trainer = Trainer(accelerator="cpu", max_steps=4, limit_val_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "b",
                      callbacks=[part2 := type(part1)()])
    trainer.fit(resumed, datamodule=make_data(tiny_model_dir, pairs_file), ckpt_path=ckpt)
    assert part1.losses + part2.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(resumed.objective.reward_shift.mean, full_module.objective.reward_shift.mean)
    assert int(resumed.objective.reward_shift.count) == int(full_module.objective.reward_shift.count) == 16


def test_a_pair_objective_refuses_unpaired_data(tiny_model_dir, unpaired_file, tmp_path):
    module = PreferenceModule(model=tiny_model_dir, objective=DPO(), lr=1e-3)
    with pytest.raises(ConfigError, match="DPO learns from preference pairs.*UnpairedDataModule|objectives.BCO"):
        fit(module, unpaired_data(tiny_model_dir, unpaired_file), tmp_path, max_steps=1)


@pytest.mark.parametrize("layout", ["pairs", "unpaired"])
def test_bco_config_composes_with_the_tiny_recipe(layout, tiny_model_dir, pairs_file, unpaired_file, tmp_path,
                                                  monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = pairs_file if layout == "pairs" else unpaired_file
    data = [] if layout == "pairs" else ["--data.class_path", "sparsepo_lightning.data.UnpairedDataModule"]
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--config", "configs/methods/bco.yaml",
                "--model.model", tiny_model_dir, *data, "--data.train_file", rows, "--data.val_file", rows,
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model.objective, BCO) and cli.model.masker is None and cli.model.objective.beta == 0.1
    assert isinstance(cli.datamodule, UnpairedDataModule if layout == "unpaired" else PreferenceDataModule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/rewards/delta" in metrics
    log_dir = Path(cli.trainer.logger.log_dir)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)[OBJECTIVE_STATE]["reward_shift"]
    assert int(state["count"]) == (8 if layout == "pairs" else 4)  # tiny.yaml: batch_size 2, 2 steps
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["validations"][-1]["step"] == 2 and "accuracy" in summary["validations"][-1]
