"""Non-finite guard: NaN/inf losses or gradients skip the optimizer step without touching weights or optimizer
state, are counted and logged with the batch's rows, stop the run after N in a row; mask collapse warns."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

from sparsepo_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.masks import LearnedMasker
from sparsepo_lightning.masks.base import TokenMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.types import TokenMasks


def make_data(model_dir: str, pairs: str) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer=model_dir, train_file=pairs, batch_size=2, max_length=32,
                                max_prompt_length=16, val_split=None)


class Snapshots(Callback):
    """Parameters and optimizer state before and after every training batch."""

    def __init__(self) -> None:
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}

    @staticmethod
    def _state(trainer, pl_module) -> tuple:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        opt = trainer.optimizers[0].state_dict()["state"]
        opt = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.items()}
        return params, opt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._state(trainer, pl_module)


def _same(a: tuple, b: tuple) -> bool:
    params_equal = all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    opt_equal = a[1].keys() == b[1].keys() and all(
        torch.equal(v, b[1][k][n]) if torch.is_tensor(v) else v == b[1][k][n] for k, s in a[1].items()
        for n, v in s.items())
    return params_equal and opt_equal


def _fit(module, data, tmp_path, max_steps, callbacks=()) -> Trainer:
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


def _guard(trainer: Trainer) -> NonFiniteGuard:
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    return guard


def _nan_loss_at(module: PreferenceModule, steps: set[int]) -> None:
    shared = module._shared_step

    def step(batch, stage):
        loss = shared(batch, stage)
        return loss * float("nan") if stage == "train" and module.global_step in steps else loss

    module._shared_step = step


def test_nonfinite_loss_skips_the_step_without_changing_weights_or_optimizer_state(tiny_model_dir, pairs_file,
                                                                                    tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=LearnedMasker(), lr=1e-3)
    _nan_loss_at(module, {2})
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=r"non-finite loss at global step 2 \(epoch 0 batch 2 rows .*pairs.jsonl:\d+"):
        trainer = _fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, 4, [snaps])
    assert _same(snaps.before[2], snaps.after[2]), "a skipped step changed weights or optimizer state"
    assert not _same(snaps.before[1], snaps.after[1]) and not _same(snaps.before[3], snaps.after[3])
    guard = _guard(trainer)
    assert (guard.skipped_total, guard.consecutive) == (1, 0)
    assert [e["global_step"] for e in guard.skipped_log] == [2] and guard.skipped_log[0]["reason"] == "loss"
    assert len(guard.skipped_log[0]["batches"][0]["sources"]) == 2  # the two pairs of the batch, file:line
    assert trainer.callback_metrics["train/nonfinite/skipped_total"] == 1.0


def test_nonfinite_gradient_with_finite_loss_is_skipped_and_names_the_parameter(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, lr=1e-3)
    weight = module.policy.model.norm.weight
    weight.register_hook(lambda g: g * float("inf") if module.global_step == 1 else g)
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=r"non-finite gradient at global step 1 .*policy\.model\.norm\.weight"):
        trainer = _fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, 3, [snaps])
    assert _same(snaps.before[1], snaps.after[1])
    assert _guard(trainer).skipped_total == 1


def test_another_ranks_nonfinite_step_is_skipped_here_too(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """Under DDP the decision is all-reduced: a rank with finite values still skips when another rank did not."""
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, lr=1e-3)
    snaps = Snapshots()

    class OtherRank(Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            reduce = trainer.strategy.reduce_boolean_decision
            monkeypatch.setattr(trainer.strategy, "reduce_boolean_decision",
                                lambda d, all=True: True if pl_module.global_step == 1 else reduce(d, all=all))

    with pytest.warns(UserWarning, match="non-finite another rank at global step 1"):
        trainer = _fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, 2, [snaps, OtherRank()])
    assert _same(snaps.before[1], snaps.after[1]) and _guard(trainer).skipped_total == 1


def test_too_many_consecutive_nonfinite_steps_stop_the_run_with_causes(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, lr=1e-3, max_consecutive_nonfinite=3)
    _nan_loss_at(module, set(range(1, 100)))
    with pytest.warns(UserWarning, match="non-finite loss"), \
            pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row") as info:
        _fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, 10)
    message = str(info.value)
    for cause in ("fp16", "learning rate", "all-zero masks", "max_consecutive_nonfinite=3"):
        assert cause in message


class ZeroMasker(TokenMasker):
    """A collapsed learned mask: 0 on every token (written with the two-argument ``forward`` of user maskers)."""

    def forward(self, reference, response_mask) -> TokenMasks:
        zeros = torch.zeros(response_mask.shape)
        return TokenMasks(reward=zeros, kl=zeros, common=True, learned=True)


def test_mask_collapse_warns_after_m_batches(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=ZeroMasker(), lr=1e-3, mask_collapse_steps=2)
    with pytest.warns(UserWarning, match=r"mask collapse: .* for 2 training batches in a row"):
        trainer = _fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, 3)
    assert _guard(trainer).collapsed_batches == 3


def test_guard_options_are_validated(tiny_model_dir):
    with pytest.raises(ValueError, match="model.max_consecutive_nonfinite=0"):
        PreferenceModule(tiny_model_dir, max_consecutive_nonfinite=0)
    with pytest.raises(ValueError, match="mask_collapse_steps"):
        NonFiniteGuard(mask_collapse_steps=0)


def test_guard_state_survives_checkpoints():
    guard = NonFiniteGuard()
    guard.skipped_total, guard.consecutive = 4, 2
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped_total, other.consecutive) == (4, 2)
