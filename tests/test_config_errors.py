"""Contradictory or out-of-range options fail at start, naming the option(s) and the fix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsepo_lightning.checks import check_masker_reference
from sparsepo_lightning.cli import run as main
from sparsepo_lightning.masks import ActivationMasker, LearnedMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import DPO, SparsePO

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("mask_lr", 0.0, r"model.mask_lr=0.0: must be > 0"),
    ("mask_lr", -1e-3, r"model.mask_lr=-0.001: must be > 0"),
    ("lr", 0.0, r"model.lr=0.0: must be > 0"),
    ("warmup_ratio", 1.0, r"model.warmup_ratio=1.0: must be in \[0, 1\)"),
    ("warmup_ratio", -0.1, r"model.warmup_ratio=-0.1"),
    ("chunk_size", 0, r"model.chunk_size=0: must be >= 1"),
    ("max_consecutive_nonfinite", 0, r"model.max_consecutive_nonfinite=0"),
    ("mask_collapse_steps", 0, r"model.mask_collapse_steps=0"),
])
def test_out_of_range_module_options_fail_before_loading_models(option, value, message):
    with pytest.raises(ValueError, match=message):
        PreferenceModule("no/such-model-is-loaded", **{option: value})  # checked before any download


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"l1_reward": 0.1, "mask_on_reward": False}, ("l1_reward=0.1", "mask_on_reward=false")),
    ({"l1_kl": 0.1, "mask_on_kl": False}, ("l1_kl=0.1", "mask_on_kl=false")),
    ({"l1_reward": -1.0}, ("l1_reward must be >= 0",)),
])
def test_lambda_on_a_switched_off_mask_is_an_error(kwargs, names):
    with pytest.raises(ValueError) as info:
        SparsePO(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_learned_mask_with_a_reference_that_exposes_no_hidden_states():
    reference = nn.Linear(4, 4)  # no HF config: no per-layer hidden states to read
    with pytest.raises(ValueError, match=r"model.masker=LearnedMasker reads the reference's per-layer hidden states"):
        check_masker_reference(LearnedMasker(), reference)
    reference.config = SimpleNamespace(num_hidden_layers=2)  # no hidden_size
    with pytest.raises(ValueError, match="model.reference"):
        check_masker_reference(LearnedMasker(), reference)
    check_masker_reference(ActivationMasker(), nn.Linear(4, 4))  # does not need per-layer states


def test_masker_with_an_objective_without_masks(tiny_model_dir):
    with pytest.raises(ValueError, match="masker=LearnedMasker has no effect with objective DPO.*Remove `masker`"):
        PreferenceModule(tiny_model_dir, objective=DPO(), masker=LearnedMasker())


def test_lora_with_a_separate_reference(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.lora .* model.reference=.*Fix: remove one"):
        PreferenceModule(tiny_model_dir, lora={"r": 4}, reference=tiny_model_dir)


def test_fp16_mixed_precision_with_float16_trainable_weights(tiny_model_dir):
    """GradScaler cannot unscale fp16 gradients; the error comes at setup, before any step, with the fix."""
    module = PreferenceModule(tiny_model_dir, dtype="float16")
    module._trainer = _trainer("16-mixed")
    with pytest.raises(ValueError, match=r"trainer.precision=16-mixed .*\(model.dtype=float16; .*Fix: model.dtype"):
        module.setup("fit")
    module._trainer = _trainer("bf16-mixed")
    module.setup("fit")
    fp32 = PreferenceModule(tiny_model_dir, dtype="float32")
    fp32._trainer = _trainer("16-mixed")
    fp32.setup("fit")


def _trainer(precision: str = "32-true", device: str = "cpu") -> SimpleNamespace:
    return SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device(device)))


def test_flex_attention_training_on_cpu_is_refused_at_setup(tiny_model_dir):
    """torch has no CPU backward for FlexAttention: refused before any step, with the fix; other stages and
    other devices pass (the check reads only the option and the device)."""
    module = PreferenceModule(tiny_model_dir, attn_implementation="flex_attention")
    module._trainer = _trainer()
    with pytest.raises(ValueError, match=r"flex_attention cannot train on CPU .*Fix: model.attn_implementation: sdpa"):
        module.setup("fit")
    module.setup("validate")
    module._trainer = _trainer(device="meta")  # stands for a GPU here
    module.setup("fit")


def test_cli_reports_the_option_of_a_contradiction(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"model.warmup_ratio=1.5"):
        main(["fit", "--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir,
              "--model.warmup_ratio", "1.5"])


def test_cli_unknown_key_names_the_key(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "configs/debug/tiny.yaml", "--trainer.max_stepz", "3", "--print_config"])
    assert info.value.code != 0 and "max_stepz" in capsys.readouterr().err
