"""Chunked, response-only token statistics against a naive full-logits implementation (values and gradients).

Tolerances: values ``rtol=atol=1e-5`` and gradients ``rtol=1e-4, atol=1e-6`` (float32; the fused and naive paths
sum the same terms in a different order, chunk by chunk).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparsepo_lightning.logprobs import FusedTokenStats, final_hidden_states, output_head, token_stats
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


def fused_stats(policy, reference, ids, attention, labels, mask, chunk_size, implementation="auto"):
    hidden, _ = final_hidden_states(policy, ids, attention)
    with torch.inference_mode():  # as the module runs the reference
        ref_hidden, _ = final_hidden_states(reference, ids, attention)
    return token_stats(hidden, labels, mask, output_head(policy), ref_hidden, output_head(reference),
                       chunk_size=chunk_size, implementation=implementation)


@pytest.mark.parametrize("implementation", ["fused", "checkpoint"])
@pytest.mark.parametrize("make_model", [lambda s: tiny_llama(seed=s), lambda s: tiny_llama(tied=True, seed=s),
                                        lambda s: tiny_gpt2(seed=s)], ids=["llama", "llama-tied", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_token_stats_equal_naive_values_and_gradients(make_model, chunk_size, implementation):
    """All policy parameters, including a tied embedding/head weight (one gradient, summed by autograd)."""
    policy, reference = make_model(0), make_model(1)
    reference.requires_grad_(False)
    ids, attention, labels, mask = random_rows(n_rows=6, length=11)
    mask[2] = False  # a row without any response token
    weights = torch.randn(3, *mask.shape)  # arbitrary downstream use of the three statistics

    naive = naive_stats(policy, reference, ids, attention, labels, mask)
    naive_loss = sum((w * s).sum() for w, s in zip(weights, naive, strict=True))
    naive_grads = torch.autograd.grad(naive_loss, list(policy.parameters()))

    stats = fused_stats(policy, reference, ids, attention, labels, mask, chunk_size, implementation)
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


def naive_head_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, with_kl=True):
    """Full (n, V) log-softmaxes straight from hidden states and head parameters."""
    policy_lp = F.log_softmax(F.linear(hidden, weight, bias).float(), -1)
    ref_lp = F.log_softmax(F.linear(ref_hidden, ref_weight, ref_bias).float(), -1)
    kl = (ref_lp.exp() * (ref_lp - policy_lp)).sum(-1)
    label_lp = policy_lp.gather(-1, labels[:, None]).squeeze(-1)
    return label_lp, ref_lp.gather(-1, labels[:, None]).squeeze(-1), kl if with_kl else torch.zeros_like(kl)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])  # 7 does not divide n = 45
def test_fused_function_gradients_wrt_hidden_weight_and_bias(with_bias, with_kl, chunk_size):
    n, d, vocab = 45, 8, 61
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True) if with_bias else None
    ref_hidden, ref_weight = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    ref_bias = torch.randn(vocab, generator=g) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(3, n, generator=g)
    inputs = [t for t in (hidden, weight, bias) if t is not None]

    want = naive_head_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, with_kl)
    want_grads = torch.autograd.grad(sum((u * w).sum() for u, w in zip(upstream, want, strict=True)), inputs)
    got = FusedTokenStats.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunk_size, with_kl)
    got_grads = torch.autograd.grad(sum((u * w).sum() for u, w in zip(upstream, got, strict=True)), inputs)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_bfloat16_head_upcasts_per_chunk():
    """bf16 weights: matmul in bf16 (as the model does), statistics and weight gradient accumulated in float32."""
    n, d, vocab = 20, 16, 50
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(vocab, d, generator=g).bfloat16().requires_grad_()
    ref_hidden, ref_weight = torch.randn(n, d, generator=g).bfloat16(), torch.randn(vocab, d, generator=g).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g)
    got = FusedTokenStats.apply(hidden, weight, None, ref_hidden, ref_weight, None, labels, 6, True)
    want = naive_head_stats(hidden, weight, None, ref_hidden, ref_weight, None, labels)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    (got[0].sum() + got[2].sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16 and weight.grad.isfinite().all()


def _saved_shapes(fn):
    """Shapes of every tensor autograd saves for backward while ``fn()`` runs (no timing involved)."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


def test_fused_path_saves_no_vocabulary_sized_tensor():
    """Memory proof without timing: the naive path saves (N, T, V) log-softmaxes, the fused one only (n, d)."""
    vocab = 211
    policy, reference = tiny_llama(seed=0, vocab=vocab), tiny_llama(seed=1, vocab=vocab)
    reference.requires_grad_(False)
    ids, attention, labels, mask = random_rows(n_rows=4, length=12, vocab=vocab)

    def vocab_sized(shapes):
        return [s for s in shapes if len(s) >= 2 and s[-1] == vocab]  # the head weight is (V, d): not matched

    naive = _saved_shapes(lambda: naive_stats(policy, reference, ids, attention, labels, mask))
    assert vocab_sized(naive), "the check must be able to see (N, T, V) tensors"
    hidden, _ = final_hidden_states(policy, ids, attention)
    with torch.inference_mode():
        ref_hidden, _ = final_hidden_states(reference, ids, attention)
    fused = _saved_shapes(lambda: token_stats(hidden, labels, mask, output_head(policy), ref_hidden,
                                              output_head(reference), chunk_size=5, implementation="fused"))
    assert fused and not vocab_sized(fused)
    assert max(torch.Size(s).numel() for s in fused) <= max(int(mask.sum()) * 32, vocab * 32)  # (n, d) or (V, d)


def test_fused_rejects_wrapped_head_and_auto_falls_back():
    policy = tiny_llama()
    ids, attention, labels, mask = random_rows()
    hidden, _ = final_hidden_states(policy, ids, attention)

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    head = ScaledHead(32, policy.config.vocab_size, bias=False)
    with pytest.raises(ValueError, match="implementation='checkpoint'"):
        token_stats(hidden, labels, mask, head, implementation="fused")
    auto = token_stats(hidden, labels, mask, head)
    want = F.log_softmax(head(hidden[:, :-1]).float(), -1).gather(-1, labels[..., None]).squeeze(-1) * mask
    assert_close(auto.policy_logps, want, rtol=1e-5, atol=1e-5)


def test_chunk_starts_cover_every_token_once_and_call_the_head_at_least_once():
    """Without sharding: ceil(n / chunk_size) chunks (at least one, possibly empty, so that FSDP2 ranks with no
    response token still join the head's collective); slices past the end are empty."""
    from sparsepo_lightning.logprobs import chunk_starts

    head = torch.nn.Linear(4, 7)
    for n, size in ((0, 3), (1, 3), (3, 3), (4, 3), (10, 4)):
        starts = list(chunk_starts(n, size, head))
        assert len(starts) == max(1, -(-n // size))
        covered = [i for s in starts for i in range(n)[s:s + size]]
        assert covered == list(range(n))
