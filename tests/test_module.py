"""PreferenceModule end to end on a tiny random Llama: smoke fits per mask variant, frozen reference,
parameter groups, checkpoints without the reference, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.masks import ActivationMasker, LearnedMasker, UniformMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import DPO, IPO, TDPO2, SimPO, SparsePO
from sparsepo_lightning.optim import parameter_groups
from tests.tiny_models import tiny_llama


def make_data(model_dir: str, pairs: str) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer=model_dir, train_file=pairs, val_file=pairs, batch_size=2,
                                max_length=32, max_prompt_length=16)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def fit(module, data, tmp_path, max_steps=2, callbacks_extra=(), **trainer_kwargs) -> tuple[Trainer, LossRecorder]:
    recorder = LossRecorder()
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[recorder, *callbacks_extra], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, recorder


MASKERS = {
    "none": (SparsePO, lambda: None),
    "uniform": (SparsePO, UniformMasker),
    "activation": (SparsePO, ActivationMasker),
    "learned_common": (lambda: SparsePO(l1_reward=0.01, l1_kl=0.01), LearnedMasker),
    "learned_independent": (SparsePO, lambda: LearnedMasker(independent=True)),
}


@pytest.mark.parametrize("variant", list(MASKERS))
def test_smoke_fit_each_mask_variant(variant, tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    objective, masker = MASKERS[variant]
    module = PreferenceModule(model=tiny_model_dir, objective=objective(), masker=masker(), lr=1e-3)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    masker_before = {k: v.clone() for k, v in module.masker.state_dict().items()} if module.masker else {}
    trainer, recorder = fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, val_check_interval=2)
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert not module.reference.training and module.policy.training
    for k, v in module.reference.state_dict().items():
        assert torch.equal(v, reference_before[k]), f"reference changed: {k}"
    if variant.startswith("learned"):
        changed = [not torch.equal(v, masker_before[k]) for k, v in module.masker.state_dict().items()]
        assert any(changed), "mask network did not train"
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/logit", "train/rewards/margin", "train/rewards/accuracy", "train/kl/seq_chosen",
                "val/loss", "val/kl/masked_rejected", "val/masks/sparsity_reward_chosen", "val/masks/l1_kl_rejected"):
        assert key in logged, f"{key} not logged; got {sorted(logged)}"


@pytest.mark.parametrize("objective", [DPO(), IPO(), SimPO(), TDPO2()], ids=lambda o: type(o).__name__)
def test_other_objectives_fit(objective, tiny_model_dir, pairs_file, tmp_path):
    module = PreferenceModule(model=tiny_model_dir, objective=objective, lr=1e-3)
    assert (module.reference is None) == isinstance(objective, SimPO)  # reference-free: no second model
    _, recorder = fit(module, make_data(tiny_model_dir, pairs_file), tmp_path)
    assert all(torch.isfinite(torch.tensor(recorder.losses)))


def test_masker_with_maskless_objective_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="uses no token masks"):
        PreferenceModule(model=tiny_model_dir, objective=DPO(), masker=LearnedMasker())


def test_parameter_groups_follow_released_code():
    policy = tiny_llama()
    masker = LearnedMasker()
    masker.bind(policy)
    groups = {g["name"]: g for g in parameter_groups(policy, masker, lr=1e-6, weight_decay=0.1, mask_weight_decay=0.01)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert set(groups) == {"policy", "no_decay", "mask"}
    assert groups["policy"]["weight_decay"] == 0.1 and groups["mask"]["weight_decay"] == 0.01
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert ids["mask"] == {id(masker.reward_net.layer_weight), id(masker.reward_net.mixer_weight)}
    for p in (masker.reward_net.layer_bias, masker.reward_net.norm.weight, masker.reward_net.norm.bias,
              policy.model.norm.weight, policy.model.layers[0].input_layernorm.weight):
        assert id(p) in ids["no_decay"]
    assert id(policy.model.layers[0].mlp.down_proj.weight) in ids["policy"]
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(policy.parameters())) + len(list(masker.parameters()))
    separate = parameter_groups(policy, masker, lr=1e-6, weight_decay=0.0, mask_weight_decay=0.01, mask_lr=1e-3)
    assert {g["name"]: g["lr"] for g in separate}["mask"] == 1e-3


def test_checkpoint_excludes_reference_and_resume_is_exact(tiny_model_dir, pairs_file, tmp_path):
    def new_module():
        seed_everything(0)
        return PreferenceModule(model=tiny_model_dir, masker=LearnedMasker(), lr=1e-3, warmup_ratio=0.5)

    data = make_data(tiny_model_dir, pairs_file)
    steps_per_epoch = 8  # 16 pairs / batch 2
    seed_everything(0)
    _, full = fit(new_module(), data, tmp_path / "full", max_steps=2 * steps_per_epoch)

    seed_everything(0)
    first = new_module()
    trainer, part1 = fit(first, make_data(tiny_model_dir, pairs_file), tmp_path / "a", max_steps=2 * steps_per_epoch,
                         callbacks_extra=[StopAfterFirstEpoch()])  # same LR schedule as the full run
    assert len(part1.losses) == steps_per_epoch
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("reference.") for k in state)
    assert any(k.startswith("masker.reward_net.") for k in state) and any(k.startswith("policy.") for k in state)

    resumed = new_module()
    recorder = LossRecorder()
    trainer = Trainer(accelerator="cpu", max_steps=2 * steps_per_epoch, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path / "b", callbacks=[recorder])
    trainer.fit(resumed, datamodule=make_data(tiny_model_dir, pairs_file), ckpt_path=ckpt)
    assert part1.losses + recorder.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    reloaded = PreferenceModule.load_from_checkpoint(ckpt, weights_only=True, model=tiny_model_dir,
                                                     masker=LearnedMasker())
    for name, value in first.masker.state_dict().items():
        assert torch.equal(reloaded.masker.state_dict()[name], value)
    policy_bytes = sum(p.numel() * 4 for p in first.policy.parameters())
    assert Path(ckpt).stat().st_size < 3.5 * policy_bytes  # policy + 2 Adam moments (+ masks), not a 4th copy


def test_last_step_record_is_detached_and_matches_the_logged_loss(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, objective=SparsePO(), masker=LearnedMasker())
    fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, max_steps=1)
    record = module.last_step
    assert record is not None and record.stage == "train"
    assert record.masks.learned and not record.masks.reward.requires_grad and not record.out.loss.requires_grad
    assert record.stats.kl.shape == record.masks.reward.shape == (record.batch.input_ids.shape[0],
                                                                  record.batch.input_ids.shape[1] - 1)
    torch.testing.assert_close(record.metrics["loss"], record.out.loss.mean())
