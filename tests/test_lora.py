"""LoRA policy whose reference is the same model with adapters disabled (docs/method.md §4.1, TL;DR recipe)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from transformers import AutoModelForCausalLM

from sparsepo_lightning.masks import LearnedMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from tests.test_module import fit, make_data

pytest.importorskip("peft")
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _lora_module(model_dir: str, **kwargs) -> PreferenceModule:
    return PreferenceModule(model_dir, objective=SparsePO(), masker=LearnedMasker(independent=True), lr=1e-2,
                            lora=LORA, **kwargs)


def test_reference_is_the_base_model_and_only_adapters_and_masks_train(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = _lora_module(tiny_model_dir)
    assert module.reference is None  # no second copy of the weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = make_data(tiny_model_dir, pairs_file)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, data, tmp_path, max_steps=2)
    # after training the adapters are non-zero, yet the reference path still reproduces the base model
    reference = module._reference_outputs(batch)
    expected = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    torch.testing.assert_close(reference.last_hidden, expected)
    policy_hidden = module._causal_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert not torch.allclose(policy_hidden.last_hidden_state, expected)
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or k.startswith("masker.") for k in changed), sorted(changed)
    assert any(k.startswith("masker.") for k in changed) and any("lora_B" in k for k in changed)


def test_checkpoint_holds_adapters_and_masks_only_and_resumes(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = _lora_module(tiny_model_dir)
    trainer, _ = fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, max_steps=2)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved and all("lora_" in k or k.startswith("masker.") for k in saved), sorted(saved)
    restored = _lora_module(tiny_model_dir)  # resume through Lightning: strict load of the saved keys only
    resumed = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    resumed.fit(restored, datamodule=make_data(tiny_model_dir, pairs_file), ckpt_path=path)
    assert resumed.global_step == 2
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_lora_with_a_separate_reference_is_a_contradiction(tiny_model_dir):
    with pytest.raises(ValueError, match="contradicts"):
        PreferenceModule(tiny_model_dir, lora=LORA, reference=tiny_model_dir)
    with pytest.raises(ValueError, match="LoraConfig argument names"):
        PreferenceModule(tiny_model_dir, lora={"rank": 4})
