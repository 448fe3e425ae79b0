"""Meta-device initialisation (``PreferenceModule(meta_init=True)``): same weights as ``from_pretrained``.

The 2-process FSDP2 runs (each rank loads only its shards) are in ``tests/test_distributed.py`` (``fsdp2_meta``).
"""

from __future__ import annotations

import pytest
import torch

from sparsepo_lightning.masks import LearnedMasker
from sparsepo_lightning.meta_init import checkpoint_files, empty_causal_lm, has_meta_parameters, load_weights
from sparsepo_lightning.model_sources import load_causal_lm
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from tests.tiny_models import tiny_gpt2, tiny_llama


def _assert_same_model(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    state, want = model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(state[key], value), key
    buffers = dict(expected.named_buffers())  # non-persistent buffers (rotary frequencies) are not in state_dict
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("make", [lambda: tiny_llama(), lambda: tiny_llama(tied=True), lambda: tiny_gpt2()],
                         ids=["llama", "llama-tied", "gpt2"])
def test_meta_model_loads_the_same_weights_and_buffers_as_from_pretrained(make, tiny_tokenizer, tmp_path):
    source = make()
    source.save_pretrained(tmp_path)
    model = empty_causal_lm(str(tmp_path))
    assert has_meta_parameters(model) and all(not b.is_meta for b in model.buffers())
    tied = source.config.tie_word_embeddings
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    load_weights(model, "cpu")
    assert not has_meta_parameters(model)
    _assert_same_model(model, load_causal_lm(str(tmp_path)))
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_sharded_safetensors_index_and_bf16(tmp_path):
    """A checkpoint split into several files (``model.safetensors.index.json``), loaded in bfloat16."""
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(checkpoint_files(str(tmp_path))) > 1
    model = empty_causal_lm(str(tmp_path), dtype="bfloat16")
    load_weights(model, "cpu")
    _assert_same_model(model, load_causal_lm(str(tmp_path), dtype="bfloat16"))


def test_preference_module_meta_init_equals_the_eager_module(tiny_model_dir):
    eager = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), masker=LearnedMasker())
    lazy = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), masker=LearnedMasker(), meta_init=True)
    assert has_meta_parameters(lazy.policy) and has_meta_parameters(lazy.reference)
    assert not lazy.reference.training and all(not p.requires_grad for p in lazy.reference.parameters())
    lazy.configure_model()  # Lightning calls it; no trainer here: loads on CPU
    _assert_same_model(lazy.policy, eager.policy)
    _assert_same_model(lazy.reference, eager.reference)
    assert all(not p.requires_grad for p in lazy.reference.parameters())
    assert lazy.policy.generation_config.eos_token_id == eager.policy.generation_config.eos_token_id


def test_lora_with_meta_init_loads_base_weights_and_initialises_adapters(tiny_model_dir):
    """LoRA on a meta-device base: adapters get real init values at once (B = 0: the policy starts as the base),
    the wrapped base Linear (``q_proj.base_layer.weight``) is filled from ``q_proj.weight`` in configure_model."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    eager = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), lora=lora)
    lazy = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), lora=lora, meta_init=True)
    adapters = {k: v for k, v in lazy.policy.named_parameters() if "lora_" in k}
    assert adapters and not any(v.is_meta for v in adapters.values())
    before = {k: v.clone() for k, v in adapters.items()}
    lazy.configure_model()
    state, want = lazy.policy.state_dict(), eager.policy.state_dict()
    assert state.keys() == want.keys()
    for key, value in want.items():
        if "lora_" not in key:  # base weights loaded as from_pretrained; adapters: checked below
            assert torch.equal(state[key], value), key
    for key, value in adapters.items():  # kept through to_empty

        assert torch.equal(value, before[key]), key
        assert (value.abs().sum() == 0) == ("lora_B" in key), key
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(lazy.policy(ids).logits, eager.policy(ids).logits)  # B = 0: both equal the base


def test_meta_init_errors_name_the_fix(tmp_path, tiny_model_dir):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-format checkpoint
    with pytest.raises(FileNotFoundError, match="meta_init: false"):
        checkpoint_files(str(tmp_path))
    with pytest.raises(ValueError, match="use_dora .*Fix: set model.meta_init: false"):
        PreferenceModule(model=tiny_model_dir, meta_init=True, lora={"r": 2, "target_modules": ["q_proj"],
                                                                     "use_dora": True})
    other = tmp_path / "bigger"
    tiny_llama().save_pretrained(other)
    model = empty_causal_lm(str(other))
    config = model.config
    config.intermediate_size *= 2  # weights no longer fit the config
    config.save_pretrained(other)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(empty_causal_lm(str(other)), "cpu")
