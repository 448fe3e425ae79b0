"""Chunked, response-only token statistics against a naive full-logits implementation (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparsepo_lightning.logprobs import final_hidden_states, output_head, token_stats
from tests.tiny_models import random_rows, tiny_gpt2, tiny_llama


def naive_stats(policy, reference, ids, attention, labels, mask):
    """Full (N, T, V) log-softmax of both models, the way the released code does it."""
    policy_lp = F.log_softmax(policy(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    with torch.no_grad():
        reference_lp = F.log_softmax(reference(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    label_lp = policy_lp.gather(-1, labels[..., None]).squeeze(-1) * mask
    ref_label_lp = reference_lp.gather(-1, labels[..., None]).squeeze(-1) * mask
    kl = (reference_lp.exp() * (reference_lp - policy_lp)).sum(-1) * mask
    return label_lp, ref_label_lp, kl


def fused_stats(policy, reference, ids, attention, labels, mask, chunk_size):
    hidden, _ = final_hidden_states(policy, ids, attention)
    with torch.no_grad():
        ref_hidden, _ = final_hidden_states(reference, ids, attention)
    return token_stats(hidden, labels, mask, output_head(policy), ref_hidden, output_head(reference),
                       chunk_size=chunk_size)


@pytest.mark.parametrize("make_model", [lambda s: tiny_llama(seed=s), lambda s: tiny_llama(tied=True, seed=s),
                                        lambda s: tiny_gpt2(seed=s)], ids=["llama", "llama-tied", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_token_stats_equal_naive_values_and_gradients(make_model, chunk_size):
    policy, reference = make_model(0), make_model(1)
    reference.requires_grad_(False)
    ids, attention, labels, mask = random_rows(n_rows=6, length=11)
    weights = torch.randn(3, *mask.shape)  # arbitrary downstream use of the three statistics

    naive = naive_stats(policy, reference, ids, attention, labels, mask)
    naive_loss = sum((w * s).sum() for w, s in zip(weights, naive, strict=True))
    naive_grads = torch.autograd.grad(naive_loss, list(policy.parameters()))

    stats = fused_stats(policy, reference, ids, attention, labels, mask, chunk_size)
    fused = (stats.policy_logps, stats.reference_logps, stats.kl)
    for got, want in zip(fused, naive, strict=True):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (stats.kl[mask] >= -1e-6).all()
    assert (stats.policy_logps[~mask] == 0).all() and (stats.kl[~mask] == 0).all()
    fused_loss = sum((w * s).sum() for w, s in zip(weights, fused, strict=True))
    fused_grads = torch.autograd.grad(fused_loss, list(policy.parameters()))
    for got, want in zip(fused_grads, naive_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kl_of_model_with_itself_is_zero():
    model = tiny_llama()
    ids, attention, labels, mask = random_rows()
    stats = fused_stats(model, model, ids, attention, labels, mask, chunk_size=3)
    assert_close(stats.kl, torch.zeros_like(stats.kl), atol=1e-6, rtol=0)
    assert_close(stats.log_ratio, torch.zeros_like(stats.kl), atol=1e-6, rtol=0)


def test_reference_free_and_no_kl_modes():
    policy = tiny_llama()
    ids, attention, labels, mask = random_rows()
    hidden, _ = final_hidden_states(policy, ids, attention)
    stats = token_stats(hidden, labels, mask, output_head(policy))
    assert (stats.reference_logps == 0).all() and (stats.kl == 0).all()
    stats = token_stats(hidden, labels, mask, output_head(policy), hidden.detach(), output_head(policy), with_kl=False)
    assert (stats.kl == 0).all() and (stats.reference_logps[mask] < 0).all()


def test_final_hidden_states_returns_all_block_outputs():
    model = tiny_llama()
    ids, attention, _, _ = random_rows()
    last, layers = final_hidden_states(model, ids, attention, all_layers=True)
    assert len(layers) == model.config.num_hidden_layers
    assert_close(output_head(model)(last), model(input_ids=ids, attention_mask=attention).logits)


def test_batch_without_response_tokens_gives_zeros():
    policy = tiny_llama()
    ids, attention, labels, mask = random_rows()
    hidden, _ = final_hidden_states(policy, ids, attention)
    stats = token_stats(hidden, labels, torch.zeros_like(mask), output_head(policy), hidden.detach(),
                        output_head(policy))
    assert stats.policy_logps.shape == mask.shape and (stats.policy_logps == 0).all()
