"""Mask modules: shapes, alignment (a mask never sees the token it weights), guards, and naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparsepo_lightning.logprobs import final_hidden_states, output_head
from sparsepo_lightning.masks import ActivationMasker, LearnedMasker, ReferenceOutputs, UniformMasker
from sparsepo_lightning.masks.activation import zn_rescale
from tests.tiny_models import random_rows, tiny_gpt2, tiny_llama


def reference_outputs(model, ids, attention, masker):
    with torch.no_grad(), masker.recording():
        last, layers = final_hidden_states(model, ids, attention, masker.needs_layers)
    return ReferenceOutputs(last_hidden=last, layers=layers, head=output_head(model))


def test_uniform_masker_is_one_on_response_only():
    ids, attention, _, mask = random_rows()
    masks = UniformMasker()(None, mask)
    assert torch.equal(masks.reward, mask.float()) and masks.kl is masks.reward


def test_learned_mask_network_size_and_init():
    model = tiny_llama()
    masker = LearnedMasker()
    masker.bind(model)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    assert sum(p.numel() for p in masker.parameters()) == L * (d + 1) + L + 2 * d  # docs/method.md §3.2
    assert masker.kl_net is None
    big = LearnedMasker(init_std=0.02)
    big.bind(tiny_llama(vocab=97))
    torch.manual_seed(0)
    net = type(big.reward_net)(num_layers=64, hidden_size=256, init="released")
    assert abs(net.layer_weight.std().item() - 0.02) < 0.002
    assert (net.layer_bias == 0).all()


@pytest.mark.parametrize("independent", [False, True])
def test_learned_masks_shape_sign_and_common_flag(independent):
    model = tiny_llama()
    masker = LearnedMasker(independent=independent, init="released")  # random starts: two different networks
    masker.bind(model)
    ids, attention, _, mask = random_rows()
    masks = masker(reference_outputs(model, ids, attention, masker), mask)
    assert masks.reward.shape == mask.shape and masks.reward.dtype == torch.float32
    assert (masks.reward >= 0).all() and (masks.reward[~mask] == 0).all()
    assert masks.common is (not independent) and masks.learned
    assert (masks.kl is masks.reward) is (not independent)
    if independent:
        assert not torch.equal(masks.kl, masks.reward)


def test_learned_masks_match_naive_per_token_loop():
    """m^t = relu(sum_l v_l relu(w_l . LN(h_l^t) + b_l)) with h_l^t the state at position t (column t)."""
    model = tiny_llama()
    masker = LearnedMasker(layer_activation="relu", mixer_activation="none")
    masker.bind(model)
    net = masker.reward_net
    with torch.no_grad():
        net.layer_bias.uniform_(-0.5, 0.5)
    ids, attention, _, mask = random_rows()
    ref = reference_outputs(model, ids, attention, masker)
    got = masker(ref, mask)
    for row in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[row, t]:
                continue
            total = 0.0
            for layer in range(len(ref.layers)):
                g = F.layer_norm(ref.layers[layer][row, t], (32,), net.norm.weight, net.norm.bias, net.norm.eps)
                z = torch.relu(g @ net.layer_weight[layer] + net.layer_bias[layer])
                total = total + net.mixer_weight[layer] * z
            assert_close(got.reward[row, t], total, rtol=1e-5, atol=1e-6)


def test_learned_mask_never_sees_the_token_it_weights():
    """Changing token t+1 (the label of column t) must not change the masks of columns <= t."""
    model = tiny_llama()
    masker = LearnedMasker(layer_activation="none", mixer_activation="none", init="released")  # no ReLU zeros
    masker.bind(model)
    ids, attention, _, mask = random_rows(n_rows=2, length=12)
    mask = torch.zeros_like(mask)
    mask[:, 2:8] = True  # response columns 2..7 (labels at positions 3..8)
    base = masker(reference_outputs(model, ids, attention, masker), mask).reward
    changed_ids = ids.clone()
    changed_ids[:, 6] = (changed_ids[:, 6] + 7) % 97  # the label of column 5
    changed = masker(reference_outputs(model, changed_ids, attention, masker), mask).reward
    assert_close(changed[:, :6], base[:, :6])
    assert not torch.allclose(changed[:, 6:8], base[:, 6:8])


def test_activation_features_never_see_the_token_they_weight():
    """The per-token features behind column t (before per-response rescaling) only use positions <= t."""
    model = tiny_llama()
    masker = ActivationMasker(groups=["mlp", "attn", "resid"])
    masker.bind(model)
    ids, attention, _, _ = random_rows(n_rows=2, length=12)
    features = []
    for row_ids in (ids, torch.cat([ids[:, :6], (ids[:, 6:7] + 7) % 97, ids[:, 7:]], dim=1)):
        reference_outputs(model, row_ids, attention, masker)
        features.append(torch.stack([v[:, :-1] for g in masker.groups for v in masker._records[g]]))
    assert_close(features[0][..., :6], features[1][..., :6])
    assert not torch.allclose(features[0][..., 6:], features[1][..., 6:])


def naive_zn_rescale_row(values, mask):
    vals = values[mask]
    if vals.numel() < 2 or (vals.max() - vals.min()) <= 1e-6:
        out = torch.zeros_like(values)
        out[mask] = 1.0
        return out
    z = (vals - vals.mean()) / (vals.std(unbiased=True) + 1e-12)
    r = (z - z.min()) / (z.max() - z.min())
    out = torch.zeros_like(values)
    out[mask] = r
    return out


def test_zn_rescale_matches_naive_loop_with_guards():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g) * 1000
    mask = torch.rand(6, 9, generator=g) > 0.3
    mask[1] = False
    mask[1, 4] = True  # a 1-token response
    values[2] = 3.0  # constant activations
    mask[3] = False  # no response at all
    got = zn_rescale(values, mask)
    assert torch.isfinite(got).all()
    for row in range(6):
        assert_close(got[row], naive_zn_rescale_row(values[row], mask[row]), rtol=1e-5, atol=1e-6)
    assert got[1, 4] == 1.0 and (got[3] == 0).all()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("mapping", ["zn_rescale", "sigmoid"])
def test_activation_masker_on_hf_models(make_model, mapping):
    model = make_model()
    masker = ActivationMasker(mapping=mapping)
    masker.bind(model)
    assert len(masker._handles) == 3 * model.config.num_hidden_layers
    ids, attention, _, mask = random_rows()
    masks = masker(reference_outputs(model, ids, attention, masker), mask)
    assert masks.kl is masks.reward and masks.common and not masks.learned
    assert (masks.reward >= 0).all() and (masks.reward <= 1).all() and (masks.reward[~mask] == 0).all()
    assert not masks.reward.requires_grad


def test_activation_logits_group_equals_full_logits_mean():
    """mean_v(W h + b) = h . mean_v(W) + mean(b): the cheap path equals the mean of the real logits."""
    model = tiny_gpt2()
    masker = ActivationMasker(groups=["logits"])
    masker.bind(model)
    ids, attention, _, mask = random_rows()
    ref = reference_outputs(model, ids, attention, masker)
    cheap = masker._logit_means(ref)
    full = model(input_ids=ids, attention_mask=attention).logits.float().mean(-1)
    assert_close(cheap, full, rtol=1e-5, atol=1e-5)
    masks = masker(ref, mask)
    assert_close(masks.reward, zn_rescale(full[:, :-1], mask), rtol=1e-4, atol=1e-5)


def test_activation_masker_errors_are_actionable():
    with pytest.raises(ValueError, match="groups"):
        ActivationMasker(groups=["mlp", "bogus"])
    model = tiny_llama()
    with pytest.raises(AttributeError):
        ActivationMasker(mlp_output_module="mlp.nope").bind(model)
    masker = ActivationMasker()
    masker.bind(model)
    with pytest.raises(RuntimeError, match="recording"):
        masker(None, torch.ones(2, 3, dtype=torch.bool))


def test_learned_masks_are_float32_under_bf16_autocast():
    model = tiny_llama()
    masker = LearnedMasker()
    masker.bind(model)
    ids, attention, _, mask = random_rows()
    ref = reference_outputs(model, ids, attention, masker)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks = masker(ref, mask)
    assert masks.reward.dtype == torch.float32
    assert_close(masks.reward, masker(ref, mask).reward)


def test_learned_masks_compute_in_float32_when_a_wrapper_stores_parameters_in_bf16():
    """FSDP1 mixed precision hands the mask network bf16 parameters; it must still compute in fp32 (LayerNorm on
    fp32 input with bf16 weights raises otherwise). The result equals fp32 compute with bf16-rounded weights."""
    model = tiny_llama()
    masker = LearnedMasker(init_std=0.5, mixer_activation="none")  # no ReLU: nonzero values to compare
    masker.bind(model)
    ids, attention, _, mask = random_rows()
    ref = reference_outputs(model, ids, attention, masker)
    with torch.no_grad():
        masker.reward_net.norm.weight.uniform_(0.5, 1.5)
        masker.reward_net.norm.bias.uniform_(-0.1, 0.1)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in masker.state_dict().items()}
    masker.load_state_dict(rounded)
    expected = masker(ref, mask).reward
    masker.to(torch.bfloat16)
    masks = masker(ref, mask)
    assert masks.reward.dtype == torch.float32 and expected.abs().sum() > 0
    assert_close(masks.reward, expected, rtol=1e-6, atol=1e-7)
