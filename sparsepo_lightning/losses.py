"""Preference objectives as pure functions over per-token statistics.

Every function takes :class:`~sparsepo_lightning.types.TokenStats` in the 2B layout (chosen rows first, see
``types.py``), returns per-pair tensors of shape ``(B,)`` in a :class:`LossOutput`, and leaves the reduction
to the caller. Sums over response tokens, never length means (docs/method.md §1.2), except SimPO which is
length-normalised by definition. Users can call these from their own loops::

    stats = TokenStats.cat(chosen=TokenStats(...), rejected=TokenStats(...))
    out = sparsepo_loss(stats, masks, beta=0.8)
    out.loss.mean().backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.types import LossOutput, TokenMasks, TokenStats


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """Split a 2B-row tensor into its chosen (first B rows) and rejected (last B rows) halves."""
    if values.shape[0] % 2:
        raise ValueError(f"Expected 2B rows (chosen then rejected), got {values.shape[0]}.")
    return values.chunk(2, dim=0)


def pair_sums(values: Tensor, response_mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Σ_t w^t·v^t over response tokens, for chosen and rejected responses.

    Args:
        values: ``(2B, T)`` per-token values.
        response_mask: ``(2B, T)`` bool.
        weights: ``(2B, T)`` per-token weights (a mask), or None for weight 1.

    Returns:
        ``(chosen, rejected)``, each ``(B,)``.
    """
    weighted = values if weights is None else values * weights
    return split_pairs((weighted * response_mask).sum(-1))


def check_beta(beta: float, name: str) -> None:
    """β must be positive (every objective and every pure loss checks it alike)."""
    if not beta > 0:
        raise ConfigError(f"{name}: beta must be > 0, got {beta}.")


def check_sparsepo_options(l1_reward: float, l1_kl: float, mask_on_reward: bool, mask_on_kl: bool) -> None:
    """Refuse negative L1 coefficients and an L1 coefficient on a switched-off mask (it would penalise a mask
    the loss does not use). ``sparsepo_loss`` and the ``SparsePO`` objective both call this."""
    for name, coeff, on, switch in (("l1_reward", l1_reward, mask_on_reward, "mask_on_reward"),
                                    ("l1_kl", l1_kl, mask_on_kl, "mask_on_kl")):
        if coeff < 0:
            raise ConfigError(f"SparsePO: {name} must be >= 0, got {coeff}.")
        if coeff and not on:
            raise ConfigError(f"SparsePO: {name}={coeff} penalises a mask that is switched off ({switch}=false). "
                             f"Set {name}: 0 or {switch}: true.")


def _output(loss: Tensor, logit: Tensor, chosen: Tensor, rejected: Tensor, penalty: Tensor | None = None) -> LossOutput:
    return LossOutput(
        loss=loss,
        logit=logit,
        chosen_reward=chosen.detach(),
        rejected_reward=rejected.detach(),
        penalty=torch.zeros_like(loss) if penalty is None else penalty,
    )


def dpo_loss(stats: TokenStats, beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): ``−log σ(β[Σρ_w − Σρ_l])``; rewards ``β Σρ``. Uses no KL."""
    check_beta(beta, "dpo_loss")
    chosen, rejected = pair_sums(stats.log_ratio, stats.response_mask)
    logit = beta * (chosen - rejected)
    return _output(-F.logsigmoid(logit), logit, beta * chosen, beta * rejected)


def ipo_loss(stats: TokenStats, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17): ``(h − 1/(2β))²`` with ``h = Σρ_w − Σρ_l`` (sequence sums).

    ``logit`` is ``h``; rewards are ``Σρ`` so that their difference is ``h``. Uses no KL.
    """
    check_beta(beta, "ipo_loss")
    chosen, rejected = pair_sums(stats.log_ratio, stats.response_mask)
    h = chosen - rejected
    return _output((h - 1.0 / (2.0 * beta)) ** 2, h, chosen, rejected)


def simpo_loss(stats: TokenStats, beta: float, gamma_beta_ratio: float) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6): ``−log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)``, γ = β·ratio.

    Reference-free: reads only ``policy_logps`` and ``response_mask``. Rewards are ``β/|y| · log π(y)``
    (length-normalised), so ``logit = r_w − r_l − γ``.
    """
    check_beta(beta, "simpo_loss")
    chosen, rejected = pair_sums(stats.policy_logps, stats.response_mask)
    len_chosen, len_rejected = split_pairs(stats.response_mask.sum(-1).clamp(min=1).float())
    chosen_reward = beta * chosen / len_chosen
    rejected_reward = beta * rejected / len_rejected
    logit = chosen_reward - rejected_reward - beta * gamma_beta_ratio
    return _output(-F.logsigmoid(logit), logit, chosen_reward, rejected_reward)


def dpop_loss(stats: TokenStats, beta: float, lambda_: float) -> LossOutput:
    """DPOP / Smaug (Pal et al. 2024, Eq. 3): ``−log σ(β[Σρ_w − Σρ_l − λ·max(0, −Σρ_w)])``; rewards ``β Σρ``.
    Uses no KL."""
    check_beta(beta, "dpop_loss")
    chosen, rejected = pair_sums(stats.log_ratio, stats.response_mask)
    logit = beta * (chosen - rejected - lambda_ * torch.clamp(-chosen, min=0.0))
    return _output(-F.logsigmoid(logit), logit, beta * chosen, beta * rejected)


def weighted_dpo_loss(stats: TokenStats, masks: TokenMasks | None, beta: float) -> LossOutput:
    """Token-weighted DPO: ``−log σ(β[Σ_t m_w^t ρ_w^t − Σ_t m_l^t ρ_l^t])`` with ``m = masks.reward`` (ones when
    ``masks`` is None, which is DPO exactly); rewards ``β Σ m ρ``. The weights act as a per-token β
    (``β_t = β·m^t``): the form shared by TIS-DPO (Liu et al. 2024, arXiv 2410.04350), selection methods that keep a
    subset of tokens (0/1 weights) and per-token β methods such as TGDPO. Uses no KL; the weights get no L1 term."""
    check_beta(beta, "weighted_dpo_loss")
    weights = None if masks is None else masks.reward
    chosen, rejected = pair_sums(stats.log_ratio, stats.response_mask, weights)
    logit = beta * (chosen - rejected)
    return _output(-F.logsigmoid(logit), logit, beta * chosen, beta * rejected)


def masked_simpo_loss(stats: TokenStats, masks: TokenMasks | None, beta: float, margin: float) -> LossOutput:
    """Reference-free loss on the mean policy log-prob of the selected tokens: ``−log σ(β(ℓ̄_w − ℓ̄_l) − margin)`` with
    ``ℓ̄ = Σ_t m^t log π_θ(y^t) / Σ_t m^t`` (``m = masks.reward``, ones when None: SimPO with ``γ = margin``).

    The loss of ConfPO (Yoon et al. 2025, arXiv 2506.08712: ``β = 1.5``, ``margin = 1.6``) and SePO (Yang et al. 2024,
    arXiv 2408.13518: ``β = γ_SePO``, ``margin = λ``), whose maskers select the tokens. A pair in which either
    response has no selected token (Σm = 0) has no defined mean: its loss and logit are 0 (ConfPO's released code
    multiplies such a pair's loss by 0). Rewards are ``β ℓ̄``, so ``r_w − r_l − margin == logit``. Uses no reference.
    """
    check_beta(beta, "masked_simpo_loss")
    weights = stats.response_mask.float() if masks is None else masks.reward
    chosen, rejected = pair_sums(stats.policy_logps, stats.response_mask, weights)
    count_chosen, count_rejected = split_pairs((weights * stats.response_mask).sum(-1))
    valid = (count_chosen > 0) & (count_rejected > 0)
    chosen_reward = beta * chosen / count_chosen.clamp(min=1e-12)
    rejected_reward = beta * rejected / count_rejected.clamp(min=1e-12)
    logit = torch.where(valid, chosen_reward - rejected_reward - margin, torch.zeros_like(chosen_reward))
    loss = torch.where(valid, -F.logsigmoid(logit), torch.zeros_like(logit))
    return _output(loss, logit, chosen_reward * valid, rejected_reward * valid)


def bco_rewards(stats: TokenStats, beta: float) -> Tensor:
    """BCO's implicit reward of every row, ``r = β Σ_t ρ^t`` over response tokens, ``(rows,)`` float32 (the rows of
    pairs or of unpaired examples alike). Uses no KL."""
    check_beta(beta, "bco_rewards")
    return beta * (stats.log_ratio.float() * stats.response_mask).sum(-1)


def bco_loss(stats: TokenStats, beta: float, delta: Tensor | float, desirable: Tensor | None = None) -> LossOutput:
    """BCO (Jung et al. 2025, arXiv 2404.04656, Eq. 8): a binary classifier whose logit is the reward ``r = β Σρ``
    shifted by ``δ``: ``−log σ(r − δ)`` for a desirable response, ``−log σ(−(r − δ))`` for an undesirable one.

    ``δ`` (the reward shift, Eq. 7) is an input here, no gradient flows through it; the ``BCO`` objective keeps it as
    the running mean of all training rewards (``objectives.BCO``). Two layouts:

    - pairs (``desirable`` None, 2B rows): the chosen response is the desirable one and the rejected the undesirable
      one (TRL's ``bco_pair``); per pair ``loss = −log σ(r_w − δ) − log σ(−(r_l − δ))``, so the mean over pairs is
      Eq. 8 with the two expectations over the batch. ``logit = r_w − r_l`` (DPO's margin with the same β), rewards
      ``r_w``, ``r_l``.
    - unpaired examples (``desirable``: ``(N,)`` bool, N rows): per example ``loss = −log σ(s(r − δ))``, ``s = +1``
      for desirable and ``−1`` for undesirable rows; the mean over examples is TRL's ``BCOTrainer`` loss (on a
      batch with as many desirable as undesirable examples, half of Eq. 8). ``logit = s(r − δ)``, the classifier's
      margin (> 0: classified correctly); ``chosen_reward`` is ``r`` on desirable rows and 0 elsewhere,
      ``rejected_reward`` is ``r`` on undesirable rows and 0 elsewhere (their sum is ``r``).
    """
    check_beta(beta, "bco_loss")
    rewards = bco_rewards(stats, beta)
    delta = torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device).detach()
    if desirable is None:
        chosen, rejected = split_pairs(rewards)
        loss = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
        return _output(loss, chosen - rejected, chosen, rejected)
    if desirable.shape != rewards.shape or desirable.dtype != torch.bool:
        raise ValueError(f"bco_loss: desirable must be a bool tensor of shape {tuple(rewards.shape)} (one label per "
                         f"row), got {desirable.dtype} {tuple(desirable.shape)}.")
    logit = torch.where(desirable, rewards - delta, delta - rewards)
    zero = torch.zeros_like(rewards)
    return _output(-F.logsigmoid(logit), logit, torch.where(desirable, rewards, zero),
                   torch.where(desirable, zero, rewards))


def _tdpo(stats: TokenStats, beta: float, alpha: float | None, name: str) -> LossOutput:
    check_beta(beta, name)
    stats.require("reference_logps", "kl", by=name)
    u_chosen, u_rejected = pair_sums(stats.log_ratio, stats.response_mask)
    k_chosen, k_rejected = pair_sums(stats.kl, stats.response_mask)
    kl_term = k_chosen - k_rejected if alpha is None else alpha * (k_chosen.detach() - k_rejected)
    logit = beta * ((u_chosen - u_rejected) + kl_term)
    return _output(-F.logsigmoid(logit), logit, beta * (u_chosen + k_chosen), beta * (u_rejected + k_rejected))


def tdpo1_loss(stats: TokenStats, beta: float) -> LossOutput:
    """TDPO1 (Zeng et al. 2024, docs/method.md §1.1), KL stored positive: ``logit = β(Σρ_w − Σρ_l + K_w − K_l)``.

    Rewards ``r = β(Σρ + K)`` as in the TDPO code, so ``r_w − r_l`` is the logit.
    """
    return _tdpo(stats, beta, None, "tdpo1_loss")


def tdpo2_loss(stats: TokenStats, beta: float, alpha: float = 0.5) -> LossOutput:
    """TDPO2 (docs/method.md §1.1): ``logit = β(Σρ_w − Σρ_l + α(sg(K_w) − K_l))``, sg = stop-gradient.

    Rewards ``r = β(Σρ + K)`` as for TDPO1 (their difference is the TDPO1 logit, not this one).
    """
    return _tdpo(stats, beta, alpha, "tdpo2_loss")


def sparsepo_loss(
    stats: TokenStats,
    masks: TokenMasks,
    beta: float,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    mask_on_reward: bool = True,
    mask_on_kl: bool = True,
) -> LossOutput:
    """SparsePO (docs/method.md §1.2), KL stored positive.

    ``U = Σ m_u,w ρ_w − Σ m_u,l ρ_l``; ``K_w = Σ m_d,w KL_w``; ``logit = β(U + K_w − K_l)``;
    ``loss = −log σ(logit) + λ_u'·(Σ|m_u,w| + Σ|m_u,l|) + λ_d'·(Σ|m_d,w| + Σ|m_d,l|)``.
    A switched-off mask is ≡ 1 and gets no L1 term (a non-zero λ on it raises, as ``SparsePO`` does). With a
    common mask (``masks.common``: one tensor for both) and both switches on, λ' = λ/2 (the released code's
    halving: the same mask would otherwise be penalised twice).
    Rewards ``r = β(Σ m_u ρ + K)`` so that ``r_w − r_l == logit`` (the released code's rewards subtract K,
    docs/method.md §1.3; we fix the sign).

    Args:
        stats: per-token statistics, 2B layout.
        masks: ``m_u`` (``masks.reward``) and ``m_d`` (``masks.kl``), ``(2B, T-1)``.
        beta: β, multiplies the whole bracket.
        l1_reward: λ_u. l1_kl: λ_d.
        mask_on_reward: weight ρ by ``m_u`` (else 1). mask_on_kl: weight KL by ``m_d`` (else 1).
    """
    check_beta(beta, "sparsepo_loss")
    check_sparsepo_options(l1_reward, l1_kl, mask_on_reward, mask_on_kl)
    stats.require("reference_logps", "kl", by="sparsepo_loss")
    reward_mask = masks.reward if mask_on_reward else None
    kl_mask = masks.kl if mask_on_kl else None
    u_chosen, u_rejected = pair_sums(stats.log_ratio, stats.response_mask, reward_mask)
    k_chosen, k_rejected = pair_sums(stats.kl, stats.response_mask, kl_mask)
    logit = beta * ((u_chosen - u_rejected) + (k_chosen - k_rejected))  # same order as tdpo1_loss
    halve = 0.5 if (masks.common and mask_on_reward and mask_on_kl) else 1.0
    penalty = torch.zeros_like(logit)
    for on, coeff, mask in ((mask_on_reward, l1_reward, masks.reward), (mask_on_kl, l1_kl, masks.kl)):
        if on and coeff:
            mass_chosen, mass_rejected = pair_sums(mask.abs(), stats.response_mask)
            penalty = penalty + halve * coeff * (mass_chosen + mass_rejected)
    loss = -F.logsigmoid(logit) + penalty
    return _output(loss, logit, beta * (u_chosen + k_chosen), beta * (u_rejected + k_rejected), penalty)
