"""Target sparsity of learned masks, the token-choice controls and the mask diagnostics (docs/sparsity.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsepo_lightning.masks import ActivationMasker, LearnedMasker, RandomMasker, TokenMasker
from sparsepo_lightning.masks.controls import BernoulliControl, PermutedControl, ResponseMeanControl
from sparsepo_lightning.masks.diagnostics import diagnostic_stats, mask_diagnostics
from sparsepo_lightning.masks.learned import top_k_gate
from sparsepo_lightning.types import TokenMasks
from tests.test_masks import reference_outputs
from tests.tiny_models import random_rows, tiny_llama

CONTROLS = (PermutedControl, ResponseMeanControl, BernoulliControl)


def _bound(masker: TokenMasker, rows: int = 8, length: int = 16, seed: int = 0):
    model = tiny_llama()
    masker.bind(model)
    ids, attention, _, mask = random_rows(rows, length, seed=seed)
    return masker, reference_outputs(model, ids, attention, masker), mask


# ---- target sparsity --------------------------------------------------------------------------------------
def test_top_k_gate_keeps_exactly_k_per_response_with_a_straight_through_gradient():
    """Row 0: n = 4, target ½ → keep 2 (scores 3 and 2); row 1: n = 3, round(1.5) = 2 zeros → keep 1;
    row 2: n = 1 → keep 1 (at least one token). Backward: σ'(s − τ), τ the midpoint of the k-th and (k+1)-th."""
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0, 9.0], [5.0, 4.0, 6.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]],
                          requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    gate = top_k_gate(scores, mask, 0.5)
    assert torch.equal(gate.detach(), torch.tensor([[0.0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]))
    gate.sum().backward()
    tau = torch.tensor([[1.5], [5.5], [1.0]])
    sig = torch.sigmoid(scores.detach() - tau)
    assert_close(scores.grad, sig * (1 - sig) * mask)


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_target_sparsity_sets_the_zeros_of_every_response_and_stays_alive_while_training(target):
    """The target is reached on a tiny model at every step (exact zeros = round(target·n) per response) while
    a few Adam steps on a token objective move the masks; kept weights stay > 0; eval is deterministic."""
    masker, ref, mask = _bound(LearnedMasker(target_sparsity=target))
    optimizer = torch.optim.Adam(masker.parameters(), lr=1e-2)
    credit = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    counts = mask.sum(-1)
    want = torch.clamp(counts - torch.round(target * counts), min=1)
    for _ in range(5):
        masks = masker(ref, mask)
        assert torch.equal(((masks.reward != 0) & mask).sum(-1), want)
        optimizer.zero_grad()
        (-(masks.reward * credit).sum()).backward()
        optimizer.step()
    masker.eval()
    first, second = masker(ref, mask).reward, masker(ref, mask).reward
    assert torch.equal(first, second) and first[first != 0].mean() > 0.5  # kept weights alive on average
    assert masker.sparsity_targets() == {"reward": 100 * target, "kl": 100 * target}


@pytest.mark.parametrize("independent", [False, True])
def test_every_mask_parameter_gets_a_gradient_at_step_zero(independent):
    kl_target = 0.25 if independent else None
    masker, ref, mask = _bound(LearnedMasker(independent=independent, target_sparsity=0.5,
                                             target_sparsity_kl=kl_target))
    masks = masker(ref, mask)
    ((masks.reward + 2 * masks.kl) * torch.randn(mask.shape)).sum().backward()
    for name, param in masker.named_parameters():
        assert param.grad is not None and (param.grad != 0).any(), name
    if independent:  # the KL mask's own target: n − round(n/4) kept
        counts = mask.sum(-1)
        assert torch.equal(((masks.kl != 0) & mask).sum(-1), counts - torch.round(0.25 * counts))


def test_target_gradients_are_exact_under_accumulation():
    """No statistic crosses responses: two half-batches of accumulated gradient (each a mean over its rows,
    halved) equal one batch of all rows."""
    masker, ref, mask = _bound(LearnedMasker(target_sparsity=0.5))
    credit = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))

    def loss(rows: slice) -> torch.Tensor:
        sub = type(ref)(last_hidden=ref.last_hidden[rows], layers=tuple(h[rows] for h in ref.layers), head=ref.head)
        return (masker(sub, mask[rows]).reward * credit[rows]).sum(-1).mean()

    loss(slice(None)).backward()
    whole = {n: p.grad.clone() for n, p in masker.named_parameters()}
    masker.zero_grad()
    for rows in (slice(0, 4), slice(4, 8)):
        (loss(rows) / 2).backward()
    for name, param in masker.named_parameters():
        assert_close(param.grad, whole[name], rtol=1e-5, atol=1e-7)


def test_target_options_are_checked():
    with pytest.raises(ValueError, match="independent: true"):
        LearnedMasker(target_sparsity_kl=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LearnedMasker(target_sparsity=1.0)
    default = LearnedMasker()
    default.bind(tiny_llama())
    assert default.reward_gate is None and default.sparsity_targets() == {}  # released behaviour unchanged


# ---- controls ---------------------------------------------------------------------------------------------
def _wrapped_ref(control_type, seed: int = 0, **masker_options):
    """A control around a learned mask with half of each response at 0 (weights differ between tokens)."""
    return _bound(control_type(LearnedMasker(target_sparsity=0.5, **masker_options), seed=seed))


def test_permuted_control_keeps_each_response_multiset_and_moves_positions():
    control, ref, mask = _wrapped_ref(PermutedControl, independent=True, target_sparsity_kl=0.25)
    inner = control.masker(ref, mask)
    out = control(ref, mask)
    assert not out.common and out.learned
    for got, want in ((out.reward, inner.reward), (out.kl, inner.kl)):
        for row in range(mask.shape[0]):  # naive per-row check of the vectorised shuffle
            assert torch.equal(got[row][mask[row]].sort().values, want[row][mask[row]].sort().values)
            assert (got[row][~mask[row]] == 0).all()
        assert not torch.equal(got, want)
    # one permutation for both masks: each token keeps its (reward, kl) pair
    pairs = lambda m: sorted(zip(m.reward[mask].tolist(), m.kl[mask].tolist(), strict=True))  # noqa: E731
    assert pairs(out) == pairs(inner)
    ((out.reward + out.kl) * torch.randn(mask.shape)).sum().backward()
    assert all(p.grad is not None for p in control.parameters())


def test_response_mean_control_keeps_each_response_mean():
    control, ref, mask = _wrapped_ref(ResponseMeanControl)
    inner, out = control.masker(ref, mask).reward, control(ref, mask).reward
    counts = mask.sum(-1)
    assert_close(out.sum(-1) / counts, inner.sum(-1) / counts)
    for row in range(mask.shape[0]):
        values = out[row][mask[row]]
        assert_close(values, values[:1].expand_as(values))


def test_bernoulli_control_keep_rate_follows_the_wrapped_masker_at_that_step():
    """A random wrapped masker keeps 30 % of 6,400 tokens: the control's keep rate lies in the binomial 99 %
    interval around the wrapped rate of that very batch, and its kept tokens carry the wrapped mean kept weight."""
    mask = torch.ones(64, 100, dtype=torch.bool)
    mask[:, 90:] = False
    control = BernoulliControl(RandomMasker(keep_rate=0.3, value=0.7, seed=5), seed=1)
    for _ in range(2):
        calls = control.masker.calls
        out = control(None, mask).reward
        control.masker.calls = calls
        inner = control.masker(None, mask).reward  # the same draw the control saw
        n = mask.sum().item()
        rate = ((inner != 0) & mask).sum().item() / n
        half_width = 2.5758 * math.sqrt(rate * (1 - rate) / n)
        got = ((out != 0) & mask).sum().item() / n
        assert abs(got - rate) <= half_width
        assert_close(out[out != 0], torch.full_like(out[out != 0], 0.7))
        assert (out[~mask] == 0).all()


@pytest.mark.parametrize("control_type", CONTROLS)
def test_controls_delegate_to_the_wrapped_masker_and_resume_exactly(control_type):
    activation = control_type(ActivationMasker(), seed=3)
    assert activation.needs_layers == ActivationMasker.needs_layers and activation.takes_context
    assert not control_type(RandomMasker(0.5)).needs_reference
    control, ref, mask = _wrapped_ref(control_type, seed=3)
    control(ref, mask)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in control.state_dict().items()}
    assert state["_extra_state"] == {"calls": 1, "eval_calls": 0}
    after = [control(ref, mask).reward for _ in range(2)]
    fresh, _, _ = _wrapped_ref(control_type, seed=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh(ref, mask).reward, want) for want in after)
    control.eval()  # evaluation draws have their own counter: training draws never shift
    control(ref, mask)
    assert control.calls == 3 and control.eval_calls == 1


# ---- diagnostics ------------------------------------------------------------------------------------------
def _naive(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    gini, eff, cv, values, means = [], [], [], [], []
    for row in range(weights.shape[0]):
        w = weights[row][mask[row]].double()
        if not len(w):
            continue
        n, s = len(w), w.sum()
        pairs = sum(abs(a - b) for a in w for b in w)
        gini.append(float(pairs / (2 * n * s)) if s > 0 else 0.0)
        eff.append(float(s * s / (n * (w * w).sum())) if (w * w).sum() > 0 else 0.0)
        cv.append(float(w.std(unbiased=False) / w.mean()) if w.mean() > 0 else 0.0)
        values.append(w)
        means.append(torch.full_like(w, float(w.mean())))
    every, group = torch.cat(values), torch.cat(means)
    total = ((every - every.mean()) ** 2).sum()
    return {"zeros_share": float((every == 0).double().mean()), "mean": float(every.mean()),
            "mean_kept": float(every.sum() / (every != 0).sum()), "gini": sum(gini) / len(gini),
            "effective_token_ratio": sum(eff) / len(eff), "within_cv": sum(cv) / len(cv),
            "between_variance_share": float(((group - every.mean()) ** 2).sum() / total)}


def test_diagnostics_hand_computed():
    """Row 0: w = (0, 1, 2, 3): Gini = (−3·0 − 1 + 2 + 9)/(4·6) = 5/12, effective ratio 36/(4·14) = 9/14,
    CV √1.25 / 1.5. Row 1: (1, 1, 1, 1): Gini 0, ratio 1, CV 0. Grand mean 1.25; between-response sum of squares
    4·0.25² + 4·0.25² = 0.5 over a total of Σ(w − 1.25)² = 14 + 4 − 8·1.25² = 5.5."""
    w = torch.tensor([[0.0, 1, 2, 3, 9], [1, 1, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]).bool()
    got = mask_diagnostics(w, mask)
    want = {"zeros_share": 1 / 8, "mean": 10 / 8, "mean_kept": 10 / 7, "gini": 5 / 24, "effective_token_ratio":
            (9 / 14 + 1) / 2, "within_cv": math.sqrt(1.25) / 1.5 / 2, "between_variance_share": 0.5 / 5.5}
    assert set(got) == set(want) and all(v.dtype == torch.float32 for v in got.values())
    for name, value in want.items():
        assert got[name].item() == pytest.approx(value, rel=1e-5), name


def test_diagnostics_identities_and_naive_loop():
    mask = torch.ones(3, 5, dtype=torch.bool)
    uniform = mask_diagnostics(torch.full((3, 5), 0.7), mask)
    assert uniform["gini"] == 0 and uniform["within_cv"] == 0 and uniform["between_variance_share"] == 0
    assert uniform["effective_token_ratio"].item() == pytest.approx(1.0)
    one_hot = mask_diagnostics(torch.eye(5)[:3], mask)  # one token carries everything: Gini 1 − 1/n, ratio 1/n
    assert one_hot["gini"].item() == pytest.approx(0.8)
    assert one_hot["effective_token_ratio"].item() == pytest.approx(0.2)
    _, _, _, resp = random_rows(6, 14, seed=3)
    resp[5] = False  # a row without response tokens is left out
    weights = torch.rand(resp.shape, generator=torch.Generator().manual_seed(4)) * (torch.rand(resp.shape) > 0.3)
    got = mask_diagnostics(weights * resp, resp)
    for name, value in _naive(weights, resp).items():
        assert got[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_diagnostic_stats_split_chosen_rejected_and_copy_common_masks():
    _, _, _, resp = random_rows(4, 12, seed=1)
    weights = torch.rand(resp.shape) * resp
    stats = diagnostic_stats(TokenMasks(reward=weights, kl=weights), resp).reduce()
    chosen = mask_diagnostics(weights[:2], resp[:2])
    assert stats["masks/gini_reward_chosen"] == pytest.approx(chosen["gini"].item())
    assert stats["masks/gini_kl_rejected"] == stats["masks/gini_reward_rejected"]


def test_docs_worked_example_prints_what_the_page_says(capsys):
    """docs/sparsity.md's python block runs as written and prints the text block after it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "sparsity.md").read_text()
    code, printed = re.search(r"```python\n(.*?)```.*?```text\n(.*?)```", text, flags=re.S).groups()
    exec(compile(code, "docs/sparsity.md", "exec"), {})
    assert capsys.readouterr().out == printed


def test_mask_statistics_log_the_target_and_the_diagnostics():
    from types import SimpleNamespace

    from sparsepo_lightning.callbacks import MaskStatistics

    _, _, _, resp = random_rows(4, 12, seed=2)
    weights = torch.rand(resp.shape) * resp
    record = SimpleNamespace(masks=TokenMasks(reward=weights, kl=weights), stats=SimpleNamespace(response_mask=resp))
    masker = LearnedMasker(independent=True, target_sparsity=0.5, target_sparsity_kl=0.2)
    stats = MaskStatistics()._collect(record, SimpleNamespace(masker=masker), histograms=False).reduce()
    assert stats["masks/target_sparsity_reward"] == 50.0 and stats["masks/target_sparsity_kl"] == 20.0
    assert stats["masks/effective_token_ratio_reward_chosen"] == pytest.approx(
        mask_diagnostics(weights[:2], resp[:2])["effective_token_ratio"].item())


def test_target_sparsity_step_is_the_same_on_the_packed_layout(tiny_model_dir, pairs_file, tmp_path):
    """One optimizer step with a target-sparsity mask on the padded and on the packed layout: same loss, same
    updated mask parameters (the masker reads the padded layout either way)."""
    from tests.distributed_run import one_step

    runs = [one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path / layout, layout=layout,
                     masker=LearnedMasker(target_sparsity=0.5)) for layout in ("padded", "packed")]
    assert runs[1]["loss"][0] == pytest.approx(runs[0]["loss"][0], rel=1e-5)
    before = runs[0]["before"]["masker"]
    assert max((v - before[k]).abs().max().item() for k, v in runs[0]["after"]["masker"].items()) > 1e-4
    for name, value in runs[0]["after"]["masker"].items():
        assert_close(runs[1]["after"]["masker"][name], value, rtol=1e-4, atol=1e-6)
