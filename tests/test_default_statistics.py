"""The exact statistics are on by default, each quantity is logged once, and a plug-in's own metrics are in them.

A CLI fit with the default callbacks and its TensorBoard tags: ``tests/test_cli.py`` (test_fit_from_cli_...); the
real quickstart's per-step tags and layout: ``tests/test_quickstart.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor

from sparsepo_lightning.callbacks import MaskStatistics, RewardStatistics
from sparsepo_lightning.callbacks.statistics import exactly_logged
from sparsepo_lightning.cli import missing_statistics
from sparsepo_lightning.metrics import log_metrics
from sparsepo_lightning.types import LossOutput, PreferenceBatch, StepRecord, TokenStats

ROOT = Path(__file__).resolve().parents[1]


def test_missing_statistics_adds_only_what_the_callbacks_lack():
    added = missing_statistics([], with_logger=True)
    assert [type(c) for c in added] == [MaskStatistics, RewardStatistics, LearningRateMonitor]
    assert added[0].histogram_every_n_steps == 50 and added[2].logging_interval == "step"
    own = MaskStatistics(histogram_every_n_steps=5)
    assert [type(c) for c in missing_statistics([own], with_logger=False)] == [RewardStatistics]  # no logger: no LR


def test_default_yaml_writes_out_the_defaults():
    """callbacks/default.yaml (the defaults, to edit) configures the statistics as the CLI adds them."""
    listed = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {})
              for c in yaml.safe_load((ROOT / "callbacks/default.yaml").read_text())["trainer"]["callbacks"]}
    for callback in missing_statistics([], with_logger=True):
        name = type(callback).__name__
        assert name in listed, name
        for key, value in listed[name].items():
            assert getattr(callback, key) == value, (name, key)


def test_exactly_logged_splits_the_names_between_the_two_callbacks():
    both = exactly_logged([MaskStatistics(), RewardStatistics()])
    assert both("masks/sparsity_reward_chosen") and both("loss") and both("treg/sequence_weight")
    masks_only = exactly_logged([MaskStatistics()])
    assert masks_only("masks/mean_reward") and not masks_only("rewards/margin")
    assert not exactly_logged([])("loss")


class _Recorder:
    def __init__(self) -> None:
        self.calls: dict[str, dict] = {}

    def log(self, name: str, value: torch.Tensor, **kwargs) -> None:
        self.calls[name] = kwargs


def test_log_metrics_keeps_exactly_logged_values_out_of_the_loggers_only():
    metrics = {"loss": torch.tensor(0.5), "masks/mean_reward": torch.tensor(1.0), "rewards/margin": torch.tensor(2.0)}
    exact = exactly_logged([MaskStatistics()])
    for stage, expected in (("train", {"loss": True, "masks/mean_reward": False}),
                            ("val", {"loss": True, "masks/mean_reward": False}),
                            ("test", {"loss": True, "masks/mean_reward": True})):  # no exact test-stage statistics
        module = _Recorder()
        log_metrics(module, stage, metrics, 4, exact)
        assert set(module.calls) == {f"{stage}/{name}" for name in metrics}  # all still logged (progress, monitors)
        for name, logger in expected.items():
            assert module.calls[f"{stage}/{name}"]["logger"] is logger, (stage, name)
    module = _Recorder()
    log_metrics(module, "train", metrics, 4)  # no statistics callbacks: every per-batch value goes to the loggers
    assert all(call["logger"] for call in module.calls.values())


def _record(metrics: dict[str, torch.Tensor], pairs: int) -> StepRecord:
    """A training record of ``pairs`` pairs whose objective reports ``metrics`` (responses of 2 tokens)."""
    rows = 2 * pairs
    logps = torch.zeros(rows, 2)
    mask = torch.ones(rows, 2, dtype=torch.bool)
    stats = TokenStats(policy_logps=logps, reference_logps=logps, kl=logps, response_mask=mask)
    out = LossOutput(loss=torch.zeros(pairs), logit=torch.zeros(pairs), chosen_reward=torch.zeros(pairs),
                     rejected_reward=torch.zeros(pairs), penalty=torch.zeros(pairs))
    batch = PreferenceBatch(input_ids=torch.zeros(rows, 3, dtype=torch.long),
                            attention_mask=torch.ones(rows, 3, dtype=torch.long),
                            labels=torch.zeros(rows, 3, dtype=torch.long))
    return StepRecord("train", batch, stats, None, out, metrics)


def test_reward_statistics_include_the_objectives_own_metrics_weighted_by_pairs():
    """Two micro-batches of 1 and 3 pairs report a plug-in metric 1.0 and 3.0: the window's value is
    (1·1 + 3·3) / 4 = 2.5, the pair-weighted mean; a name RewardStatistics defines itself keeps its definition."""
    callback = RewardStatistics()
    first = callback._collect(_record({"treg/sequence_weight": torch.tensor(1.0), "loss": torch.tensor(9.0)}, 1),
                              SimpleNamespace(), False)
    second = callback._collect(_record({"treg/sequence_weight": torch.tensor(3.0), "loss": torch.tensor(9.0)}, 3),
                               SimpleNamespace(), False)
    callback._train.update(first)
    callback._train.update(second)
    out = callback._train.compute()
    torch.testing.assert_close(out["treg/sequence_weight"], torch.tensor(2.5))
    torch.testing.assert_close(out["loss"], torch.tensor(0.0))  # loss_stats of the records, not the reported 9.0
