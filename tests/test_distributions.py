"""Full-distribution statistics (``distributions.py``) against a naive full-logits implementation: values and
gradients on both paths, the chunk rule, and no vocabulary-sized tensor saved for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sparsepo_lightning.distributions import ChunkLogits, DistributionStatistic, Entropy, distribution_stats, rowdot

N, T, D, V = 4, 7, 8, 13


class TeacherKL(DistributionStatistic):
    """A generic (autograd-differentiated) test statistic reading three models: KL(π_θ ‖ softmax(z_ref + z_x))."""

    reads_reference = True

    def frozen_model_names(self) -> tuple[str, ...]:
        return ("x",)

    def __call__(self, logits: ChunkLogits) -> torch.Tensor:
        log_q = torch.log_softmax(logits["reference"] + logits["x"], -1)
        log_p = torch.log_softmax(logits["policy"], -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)


def _setup(bias: bool = True):
    g = torch.Generator().manual_seed(0)
    heads = {name: nn.Linear(D, V, bias=bias) for name in ("policy", "reference", "x")}
    for name, head in heads.items():
        nn.init.normal_(head.weight, generator=g)
        head.requires_grad_(name == "policy")
    hidden = {name: torch.randn(N, T, D, generator=g) for name in heads}
    hidden["policy"].requires_grad_()
    labels = torch.randint(0, V, (N, T - 1), generator=g)
    mask = torch.rand(N, T - 1, generator=g) > 0.3
    mask[1] = False  # a row without response tokens
    return heads, hidden, labels, mask


def _naive(heads, hidden, mask):
    """(N, T-1, V) logits of every model, the statistics over all positions, zeroed off the response."""
    z = {name: heads[name](hidden[name][:, :-1]).float() for name in heads}
    log_p = torch.log_softmax(z["policy"], -1)
    log_q = torch.log_softmax(z["reference"] + z["x"], -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    ref_lp = torch.log_softmax(z["reference"], -1)
    ref_entropy = -(ref_lp.exp() * ref_lp).sum(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"entropy": entropy * mask, "ref_entropy": ref_entropy * mask, "kl": kl * mask}


STATS = {"entropy": Entropy(), "ref_entropy": Entropy("reference"), "kl": TeacherKL()}


@pytest.mark.parametrize("implementation", ["fused", "checkpoint"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])  # 5 does not divide the number of response tokens
def test_values_and_gradients_equal_the_naive_full_logits(implementation, chunk_size):
    heads, hidden, labels, mask = _setup()
    upstream = torch.randn(3, N, T - 1, generator=torch.Generator().manual_seed(1))
    params = [hidden["policy"], heads["policy"].weight, heads["policy"].bias]

    want = _naive(heads, hidden, mask)
    want_grads = torch.autograd.grad(sum((u * want[k]).sum() for u, k in zip(upstream, STATS, strict=True)), params)
    others = {name: (hidden[name], heads[name]) for name in ("reference", "x")}
    got = distribution_stats(STATS, hidden["policy"], labels, mask, heads["policy"], others, chunk_size,
                             implementation)
    got_grads = torch.autograd.grad(sum((u * got[k]).sum() for u, k in zip(upstream, STATS, strict=True)), params)
    for name in STATS:
        assert got[name].dtype == torch.float32 and (got[name][~mask] == 0).all()
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_entropy_by_hand():
    """V = 3, logits (0, 0, log 2): p = (1/4, 1/4, 1/2), H = 2·(1/4)·log 4 + (1/2)·log 2 = 1.5·log 2."""
    head = nn.Linear(1, 3, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, torch.log(torch.tensor(2.0))]))
    hidden = torch.zeros(1, 2, 1)
    mask = torch.tensor([[True]])
    got = distribution_stats({"h": Entropy()}, hidden, torch.zeros(1, 1, dtype=torch.long), mask, head)
    assert_close(got["h"], torch.tensor([[1.5 * torch.log(torch.tensor(2.0)).item()]]))


def test_uniform_distribution_has_log_v_entropy_and_zero_self_kl():
    """Identities: a zero head gives the uniform distribution (H = log V); KL of a model to itself is 0."""
    heads, hidden, labels, mask = _setup(bias=False)
    zero = nn.Linear(D, V, bias=False)
    nn.init.zeros_(zero.weight)
    got = distribution_stats({"h": Entropy()}, hidden["policy"], labels, mask, zero)
    assert_close(got["h"][mask], torch.full((int(mask.sum()),), float(torch.log(torch.tensor(float(V))))))

    class SelfKL(DistributionStatistic):
        def __call__(self, logits):
            return (torch.log_softmax(logits["policy"], -1) - torch.log_softmax(logits["policy"], -1)).sum(-1)

    assert (distribution_stats({"k": SelfKL()}, hidden["policy"], labels, mask, heads["policy"])["k"] == 0).all()


def test_no_response_token_gives_zeros_and_a_connected_graph():
    heads, hidden, labels, mask = _setup()
    none = torch.zeros_like(mask)
    for implementation in ("fused", "checkpoint"):
        got = distribution_stats({"h": Entropy()}, hidden["policy"], labels, none, heads["policy"],
                                 implementation=implementation)
        assert (got["h"] == 0).all()
        got["h"].sum().backward()


def test_a_missing_model_is_named():
    heads, hidden, labels, mask = _setup()
    with pytest.raises(ValueError, match="reference, x"):
        distribution_stats({"kl": TeacherKL()}, hidden["policy"], labels, mask, heads["policy"])


def test_rowdot_equals_the_row_sums_of_products():
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    assert_close(rowdot(a, b), (a * b).sum(-1))


def test_the_fused_path_saves_no_vocabulary_sized_tensor():
    """Memory proof without timing: every tensor saved for backward is (n, d), (V, d), (V,), (n,) or the (N, T-1)
    response mask — never (n, V)."""
    heads, hidden, labels, mask = _setup()
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    others = {name: (hidden[name], heads[name]) for name in ("reference", "x")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        distribution_stats(STATS, hidden["policy"], labels, mask, heads["policy"], others, chunk_size=2,
                           implementation="fused")
    n = int(mask.sum())
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == V]
    assert all(s in {(n, D), (V, D), (V,), (n,), (N, T - 1)} for s in shapes), shapes  # + the response mask
