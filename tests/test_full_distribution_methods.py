"""The methods on the full-distribution point: high-entropy selection and AlignDistil, against numbers worked by
hand (V = 3, one to three tokens), naive full-logits implementations and per-row loops; their configs parse on the
tiny and the quickstart recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sparsepo_lightning.distributions import distribution_stats
from sparsepo_lightning.masks.base import TokenContext
from sparsepo_lightning.methods.aligndistil import STATISTIC, AlignDistil, TeacherDivergence
from sparsepo_lightning.methods.entropy import HighEntropySelection
from sparsepo_lightning.types import TokenStats

ROOT = Path(__file__).resolve().parents[1]
NEW_METHODS = ("aligndistil", "entropy", "treg")  # treg: tests/test_treg.py (prompt variants)


def _context(values: torch.Tensor, mask: torch.Tensor, name: str) -> TokenContext:
    stats = TokenStats(torch.zeros_like(values), torch.zeros_like(values), response_mask=mask,
                       distribution={name: values})
    return TokenContext(mask, stats=stats)


# ---- high-entropy selection ------------------------------------------------------------------------------------
ENTROPY = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_entropy_selection_keeps_the_highest_entropy_tokens_of_the_batch():
    """5 response tokens, keep 0.34 → ceil(1.7) = 2 tokens: H = 0.9 (row 0, t 1) and 0.7 (row 1, t 0)."""
    masks = HighEntropySelection(keep_ratio=0.34)(None, MASK, _context(ENTROPY, MASK, "entropy_policy"))
    assert torch.equal(masks.reward, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert masks.common and torch.equal(masks.kl, masks.reward)


def test_entropy_selection_per_response_equals_a_per_row_loop():
    """scope: response, keep 0.5 → row 0 keeps ceil(1.5) = 2 (0.9, 0.5), row 1 ceil(1.0) = 1 (0.7) — and a naive loop
    over rows agrees on random scores."""
    masks = HighEntropySelection(keep_ratio=0.5, scope="response")(None, MASK, _context(ENTROPY, MASK,
                                                                                          "entropy_policy"))
    assert torch.equal(masks.reward, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    scores, mask = torch.rand(6, 9, generator=g), torch.rand(6, 9, generator=g) > 0.3
    got = HighEntropySelection(keep_ratio=0.4, scope="response", model="reference")(
        None, mask, _context(scores, mask, "entropy_reference")).reward
    for row in range(6):
        idx = mask[row].nonzero().squeeze(-1)
        keep = math.ceil(0.4 * len(idx) - 1e-6)
        top = idx[scores[row, idx].argsort(descending=True)[:keep]]
        want = torch.zeros(9)
        want[top] = 1.0
        assert torch.equal(got[row], want), row


def test_entropy_selection_declares_its_statistic_and_refuses_bad_options():
    masker = HighEntropySelection(model="reference")
    assert masker.needs_reference and set(masker.distribution_statistics()) == {"entropy_reference"}
    assert not HighEntropySelection().needs_reference
    with pytest.raises(Exception, match="keep_ratio"):
        HighEntropySelection(keep_ratio=0.0)
    with pytest.raises(Exception, match="policy' or 'reference"):
        HighEntropySelection(model="teacher")
    with pytest.raises(ValueError, match="entropy_policy"):
        HighEntropySelection()(None, MASK, TokenContext(MASK))


# ---- AlignDistil -----------------------------------------------------------------------------------------------
def _bias_head(*rows: tuple[float, ...]) -> nn.Linear:
    """A head whose logits at position i are ``rows[i]``: hidden one-hot (i), weight = rows transposed."""
    head = nn.Linear(len(rows), 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rows).t())
    return head


def _one_hot_hidden(n: int) -> torch.Tensor:
    return torch.eye(n)[None, :, :].expand(1, n, n).contiguous()  # (1, n, d = n): position i → logits rows[i]


LN = math.log


def test_teacher_and_divergence_by_hand():
    """One position, V = 3. z_ref = (0, 0, 0), z_dpo = (ln 2, 0, 0), z_rdpo = (0, 0, 0):
    π_dpo = (1/2, 1/4, 1/4), π_rdpo = (1/3, 1/3, 1/3), Σ|Δπ| = 1/6 + 1/12 + 1/12 = 1/3;
    r = 6, ε = 0 → α = 2; log π* = 3 log π_dpo − 2 log π_rdpo → π* ∝ π_dpo³ = (1/8, 1/64, 1/64) → (0.8, 0.1, 0.1).
    Policy z_θ = 0 → π_θ = 1/3 each: KL = ln(1/3) − ⅓(ln .8 + 2 ln .1) = 0.510826; β = 0.1 → ℓ = 0.05 · KL;
    ∂ℓ/∂z_θ = 0.05 · π_θ(ln π_θ − ln π* − KL) = 0.05 · (−ln 4 / 3, ln 2 / 3, ln 2 / 3)."""
    policy = _bias_head((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    policy.requires_grad_(True)
    others = {"dpo": (_one_hot_hidden(2), _bias_head((LN(2), 0.0, 0.0), (0.0, 0.0, 0.0))),
              "reverse_dpo": (_one_hot_hidden(2), _bias_head((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)))}
    hidden = _one_hot_hidden(2).requires_grad_()
    mask = torch.tensor([[True]])
    stat = TeacherDivergence("dpo", "reverse_dpo", beta=0.1, adaptive=True, tv_scale=6.0, epsilon=0.0, alpha=1.0)
    kl = LN(1 / 3) - (LN(0.8) + 2 * LN(0.1)) / 3
    assert abs(kl - 0.510826) < 1e-6
    for implementation in ("fused", "checkpoint"):
        got = distribution_stats({"d": stat}, hidden, torch.zeros(1, 1, dtype=torch.long), mask, policy, others,
                                 implementation=implementation)["d"]
        assert_close(got, torch.tensor([[0.05 * kl]]))
        (grad_w,) = torch.autograd.grad(got.sum(), policy.weight)  # ∂ℓ/∂z at position 0 = column 0 of ∂W
        assert_close(grad_w[:, 0], 0.05 * torch.tensor([-LN(4) / 3, LN(2) / 3, LN(2) / 3]))
    constant = TeacherDivergence("dpo", "reverse_dpo", beta=0.1, adaptive=False, tv_scale=6.0, epsilon=0.0,
                                 alpha=1.0)
    got = distribution_stats({"d": constant}, hidden, torch.zeros(1, 1, dtype=torch.long), mask, policy, others)
    # α = 1: π* ∝ π_dpo² / π_rdpo ∝ (1/4, 1/16, 1/16) → (2/3, 1/6, 1/6); ℓ = (0.1 / 1) · (ln ⅓ − ⅓(ln ⅔ + 2 ln ⅙))
    assert_close(got["d"], torch.tensor([[0.1 * (LN(1 / 3) - (LN(2 / 3) + 2 * LN(1 / 6)) / 3)]]))


def test_adaptive_weight_by_hand():
    """Σ|Δπ| = 1/3 with r = 10, ε = 1e-3 → α = 3.334333; equal models → α = ε; adaptive: false → the constant."""
    stat = TeacherDivergence("a", "b", beta=0.1, adaptive=True, tv_scale=10.0, epsilon=1e-3, alpha=1.5)
    log_dpo = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    log_rdpo = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]]))
    assert_close(stat.extrapolation(log_dpo, log_rdpo), torch.tensor([10 / 3 + 1e-3, 1e-3]))
    stat.adaptive = False
    assert_close(stat.extrapolation(log_dpo, log_rdpo), torch.tensor([1.5, 1.5]))


def _naive_divergence(z, dpo, rdpo, beta, tv_scale, epsilon):
    """Full (n, V) tensors, one position at a time (a per-row loop), written as the released trainer writes it: the
    teacher on raw logits, ``α(z_dpo − z_rdpo) + z_dpo``, the loss scaled by ``β/α``."""
    out = []
    for i in range(z.shape[0]):
        p_d, p_r = torch.softmax(dpo[i], -1), torch.softmax(rdpo[i], -1)
        alpha = float((p_d - p_r).abs().sum()) * tv_scale + epsilon
        log_q = torch.log_softmax(alpha * (dpo[i] - rdpo[i]) + dpo[i], -1)
        log_p = torch.log_softmax(z[i], -1)
        out.append((log_p.exp() * (log_p - log_q)).sum() * beta / alpha)
    return torch.stack(out)


@pytest.mark.parametrize("implementation", ["fused", "checkpoint"])
def test_closed_form_gradient_equals_autograd_on_a_per_row_loop(implementation):
    n, d, vocab = 23, 6, 17
    g = torch.Generator().manual_seed(3)
    heads = {k: nn.Linear(d, vocab) for k in ("policy", "dpo", "reverse_dpo")}
    for k, head in heads.items():
        nn.init.normal_(head.weight, generator=g)
        head.requires_grad_(k == "policy")
    hidden = {k: torch.randn(1, n + 1, d, generator=g) for k in heads}
    hidden["policy"].requires_grad_()
    mask = torch.ones(1, n, dtype=torch.bool)
    labels = torch.zeros(1, n, dtype=torch.long)
    upstream = torch.randn(1, n, generator=g)
    logits = {k: heads[k](hidden[k][0, :-1]) for k in heads}
    want = _naive_divergence(logits["policy"], logits["dpo"], logits["reverse_dpo"], 0.1, 10.0, 1e-3)
    params = [hidden["policy"], heads["policy"].weight, heads["policy"].bias]
    want_grads = torch.autograd.grad((want * upstream[0]).sum(), params)
    stat = TeacherDivergence("dpo", "reverse_dpo", beta=0.1, adaptive=True, tv_scale=10.0, epsilon=1e-3, alpha=1.0)
    others = {k: (hidden[k], heads[k]) for k in ("dpo", "reverse_dpo")}
    got = distribution_stats({"d": stat}, hidden["policy"], labels, mask, heads["policy"], others, chunk_size=5,
                             implementation=implementation)["d"]
    assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), params), want_grads, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_aligndistil_loss_by_hand():
    """B = 1: chosen ℓ = (0.3, 0.5) → mean 0.4 (the loss: responses chosen); rejected ℓ = (0.2, ·) with one
    response token → 0.2; responses both: ½(0.4 + 0.2) = 0.3. Rewards: β Σρ with ρ_w = (0.1, 0.3), ρ_l = (−0.2) →
    0.1·0.4, 0.1·(−0.2). The logged scaled KL is the token mean over the distilled responses."""
    mask = torch.tensor([[True, True], [True, False]])
    d = torch.tensor([[0.3, 0.5], [0.2, 9.0]])
    stats = TokenStats(torch.tensor([[0.1, 0.3], [-0.2, 0.0]]), torch.zeros(2, 2), response_mask=mask,
                       distribution={STATISTIC: d})
    out = AlignDistil(beta=0.1)(stats)
    assert_close(out.loss, torch.tensor([0.4]))
    assert_close(out.chosen_reward, torch.tensor([0.04]))
    assert_close(out.rejected_reward, torch.tensor([-0.02]))
    assert_close(out.logit, torch.tensor([0.06]))
    both = AlignDistil(beta=0.1, responses="both")
    assert_close(both(stats).loss, torch.tensor([0.3]))
    logged = {"chosen": AlignDistil(beta=0.1), "both": both}
    assert_close(logged["chosen"].metrics(stats, None, out, None)["aligndistil/scaled_kl"], torch.tensor(0.4))
    assert_close(logged["both"].metrics(stats, None, out, None)["aligndistil/scaled_kl"], torch.tensor(1.0 / 3))


def test_aligndistil_options_are_checked():
    with pytest.raises(Exception, match="same frozen model"):
        AlignDistil(dpo="m", reverse_dpo="m")
    with pytest.raises(Exception, match="tv_scale"):
        AlignDistil(tv_scale=-1.0)
    with pytest.raises(Exception, match="divides β"):
        AlignDistil(adaptive=False, alpha=0.0)
    with pytest.raises(Exception, match="divides β"):
        AlignDistil(epsilon=0.0)  # α_t = 0 where the two models agree
    with pytest.raises(Exception, match="responses"):
        AlignDistil(responses="rejected")
    assert set(AlignDistil().distribution_statistics()[STATISTIC].frozen_model_names()) == {"dpo", "reverse_dpo"}


# ---- configs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["configs/debug/tiny.yaml", "configs/quickstart.yaml"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_method_config_parses_on_the_tiny_and_the_quickstart_recipe(method, recipe, capsys, monkeypatch):
    from sparsepo_lightning.cli import run as main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--config", f"configs/methods/{method}.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"sparsepo_lightning.methods.{method}." in printed


# ---- training through the CLI (tiny recipe) ------------------------------------------------------------------------
def test_aligndistil_trains_the_tiny_recipe_and_its_loss_is_the_naive_one(tiny_model_dir, tiny_tokenizer, pairs_file,
                                                                         tmp_path, monkeypatch):
    """2 steps through `sparsepo fit` (the DPO and reverse-DPO models: the tiny policy and another random tiny
    Llama); the frozen models stay frozen and out of the checkpoint; the last (validation) step's loss equals the
    naive full-logits AlignDistil loss of the trained policy on the same batch."""
    from tests.test_methods_fit import _fit
    from tests.tiny_models import tiny_llama

    monkeypatch.chdir(ROOT)
    other = tmp_path / "other"
    tiny_llama(seed=7, vocab=len(tiny_tokenizer)).save_pretrained(other)
    cli = _fit("aligndistil", tiny_model_dir, str(other), pairs_file, tmp_path)
    module = cli.model
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/aligndistil/scaled_kl"])
    for model in module.frozen_models.values():
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    ckpt = next((Path(cli.trainer.logger.log_dir) / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("frozen_models.") for k in saved)

    record = module.last_step
    assert record.stage == "val"
    batch = record.batch
    labels, mask = batch.shifted_labels()
    with torch.no_grad():
        z = {name: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][mask].float()
             for name, model in (("policy", module.policy), ("dpo", module.frozen_models["dpo"]),
                                 ("reverse_dpo", module.frozen_models["reverse_dpo"]))}
    naive = _naive_divergence(z["policy"], z["dpo"], z["reverse_dpo"], 0.1, 10.0, 1e-3)
    per_token = torch.zeros(mask.shape).masked_scatter(mask, naive)
    per_row = per_token.sum(-1) / mask.sum(-1).clamp_min(1)
    b = per_row.shape[0] // 2
    assert_close(record.out.loss, per_row[:b], rtol=1e-4, atol=1e-6)  # the chosen responses (the default)
    assert_close(record.stats.distribution[STATISTIC], per_token, rtol=1e-4, atol=1e-6)


def test_entropy_selection_masks_are_the_naive_top_entropy_tokens(tiny_model_dir, pairs_file):
    """One validation step of the module: the masks keep the top 50 % of the batch's response tokens by the
    policy's entropy computed from its full (N, T, V) logits."""
    from sparsepo_lightning.methods.topk import top_fraction
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import WeightedDPO
    from tests.test_module import make_data

    module = PreferenceModule(tiny_model_dir, WeightedDPO(), HighEntropySelection(keep_ratio=0.5))
    data = make_data(tiny_model_dir, pairs_file)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        module._shared_step(batch, "val")
        log_p = torch.log_softmax(module.policy(input_ids=batch.input_ids,
                                                attention_mask=batch.attention_mask).logits[:, :-1].float(), -1)
    _, mask = batch.shifted_labels()
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    record = module.last_step
    assert_close(record.stats.distribution["entropy_policy"], entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(record.masks.reward, top_fraction(entropy, mask, 0.5, "batch"))
