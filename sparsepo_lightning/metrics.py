"""Training metrics (docs/method.md §5) computed from the *same* tensors as the loss, with the §8.6 problems fixed.

Every value is a scalar tensor (mean over the B pairs of the batch); no ``.item()`` here. Names:

- ``loss``, ``logit`` (argument of −log σ), ``penalty`` (mask L1 part of the loss);
- ``rewards/{chosen,rejected,margin,accuracy}``: the objective's implicit rewards (for TDPO1/SparsePO
  ``β(Σ m_u ρ + K)``, so the margin equals the logit; the released code subtracted K, §1.3);
- ``logps/{chosen,rejected}``: Σ policy log-probs over response tokens;
- ``kl/seq_{chosen,rejected}``: unmasked sequence KL(π_ref‖π_θ) over response tokens only (the released
  sparse trainer also summed prompt and padding positions);
- ``kl/masked_{chosen,rejected}``: Σ m_d·KL (the K_w, K_l of the loss);
- ``masks/sparsity_{reward,kl}_{chosen,rejected}``: % of exact zeros among response tokens (fp32),
  ``masks/l1_{reward,kl}_{chosen,rejected}``: Σ|m| per response, ``masks/max_{reward,kl}``: max over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.losses import pair_sums, split_pairs
from sparsepo_lightning.types import LossOutput, TokenMasks, TokenStats


def response_sparsity(mask: Tensor, response_mask: Tensor) -> Tensor:
    """% of exact zeros of ``mask`` among each row's response tokens (docs/method.md §5), ``(2B,)`` float32.

    Computed in fp32: tiny fp16 mask values would underflow to 0 and count as sparse.
    """
    zeros = ((mask.detach().float() == 0) & response_mask).float().sum(-1)
    return 100.0 * zeros / response_mask.sum(-1).clamp(min=1)


def _mask_metrics(name: str, mask: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    mask = mask.detach().float()
    sparsity = response_sparsity(mask, response_mask)
    l1_chosen, l1_rejected = pair_sums(mask.abs(), response_mask)
    sparsity_chosen, sparsity_rejected = split_pairs(sparsity)
    return {
        f"masks/sparsity_{name}_chosen": sparsity_chosen.mean(),
        f"masks/sparsity_{name}_rejected": sparsity_rejected.mean(),
        f"masks/l1_{name}_chosen": l1_chosen.mean(),
        f"masks/l1_{name}_rejected": l1_rejected.mean(),
        f"masks/max_{name}": mask.masked_fill(~response_mask, -torch.inf).amax().clamp(min=0.0),
    }


def preference_metrics(stats: TokenStats, masks: TokenMasks | None, out: LossOutput) -> dict[str, Tensor]:
    """All logged metrics of one batch as scalar tensors (means over pairs), detached."""
    resp = stats.response_mask
    logps_chosen, logps_rejected = pair_sums(stats.policy_logps.detach(), resp)
    kl_chosen, kl_rejected = pair_sums(stats.kl.detach(), resp)
    metrics = {
        "loss": out.loss.detach().mean(),
        "logit": out.logit.detach().mean(),
        "penalty": out.penalty.detach().mean(),
        "rewards/chosen": out.chosen_reward.mean(),
        "rewards/rejected": out.rejected_reward.mean(),
        "rewards/margin": (out.chosen_reward - out.rejected_reward).mean(),
        "rewards/accuracy": (out.chosen_reward > out.rejected_reward).float().mean(),
        "logps/chosen": logps_chosen.mean(),
        "logps/rejected": logps_rejected.mean(),
        "kl/seq_chosen": kl_chosen.mean(),
        "kl/seq_rejected": kl_rejected.mean(),
    }
    if masks is not None:
        masked_chosen, masked_rejected = pair_sums(stats.kl.detach(), resp, masks.kl.detach())
        metrics["kl/masked_chosen"] = masked_chosen.mean()
        metrics["kl/masked_rejected"] = masked_rejected.mean()
        metrics.update(_mask_metrics("reward", masks.reward, resp))
        metrics.update(_mask_metrics("kl", masks.kl, resp))
    return metrics
