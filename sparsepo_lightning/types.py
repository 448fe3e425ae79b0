"""Typed containers passed between stages: batch -> token statistics -> masks -> loss output.

Layout convention used everywhere (docs/method.md, Notation): a batch of B preference pairs is ONE tensor of 2B rows,
chosen responses in rows ``0..B-1`` and the rejected response of the same pair in row ``B + i``. The one exception is a
batch of N *unpaired* examples (``PreferenceBatch.desirable`` set; only BCO trains on them): N rows, one per example,
labelled desirable or undesirable, in any order. Per-token
tensors are already *shifted*: column ``t`` holds the statistic of the label ``input_ids[:, t + 1]`` predicted
from the prefix ending at position ``t`` (so they have ``T - 1`` columns). Values outside the response are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from sparsepo_lightning.packing import PackedRows

IGNORE_INDEX = -100
"""Label value of prompt and padding positions (PyTorch's cross-entropy convention)."""


@dataclass
class PreferenceBatch:
    """One training batch of B pairs as 2B right-padded rows (chosen first, then rejected).

    Attributes:
        input_ids: ``(2B, T)`` token ids; padding uses the tokenizer's pad id.
        attention_mask: ``(2B, T)`` 1 on real tokens, 0 on padding.
        labels: ``(2B, T)`` equal to ``input_ids`` on response tokens and ``IGNORE_INDEX`` on prompt and
            padding positions. Not shifted.
        token_weights: ``(2B, T)`` float32 per-token weights from the optional ``chosen_spans`` /
            ``rejected_spans`` data columns, aligned with ``input_ids`` (not shifted): the largest weight of the
            spans a token intersects, 0 elsewhere (prompt, padding, rows without spans). ``None`` when no pair of
            the batch has spans; keyword-only.
        token_weighted: ``(2B, T)`` bool, True on the tokens some span covers (not shifted), or ``None`` like
            ``token_weights``; keyword-only.
        desirable: ``None`` for pairs (the 2B layout). For unpaired examples (``data.UnpairedDataModule``): an
            ``(N,)`` bool tensor, True where row ``i`` is a desirable example and False where it is an undesirable
            one; the rows are then N single examples, not pairs, and ``num_pairs`` raises. Keyword-only.
        packed: the packed layout the models run on (``data.layout: packed``, ``packing.PackedRows``), or None
            (the models run on ``input_ids``). The tensors above stay in the padded layout either way: everything
            after the models' forward reads them. Keyword-only.
        prompt_variants: per prompt variant a method declared (``prompt_variants.py``), a ``PreferenceBatch`` of 2B
            rows ``[variant prompt | the same response tokens]`` in this batch's row order, labelled on exactly the
            response tokens this batch's shifted labels score; None without variants. Keyword-only.
        row_ids: the index of each pair (or unpaired example) of the batch in its split's features, in batch order
            (``B`` ints, or ``N``), as the data module's loaders set it (``data.collate.WithRowIds``); ``None`` when
            unknown. A plain tuple, never moved to a device: ``model.reference_cache`` finds each row's cached
            statistics by it, whatever the shuffle or bucketing. Keyword-only.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_weights: Tensor | None = field(default=None, kw_only=True)
    token_weighted: Tensor | None = field(default=None, kw_only=True)
    desirable: Tensor | None = field(default=None, kw_only=True)
    packed: PackedRows | None = field(default=None, kw_only=True)
    prompt_variants: dict[str, PreferenceBatch] | None = field(default=None, kw_only=True)
    row_ids: tuple[int, ...] | None = field(default=None, kw_only=True)

    @property
    def num_pairs(self) -> int:
        if self.desirable is not None:
            raise ValueError("PreferenceBatch.num_pairs: this batch holds unpaired examples (desirable is set), not "
                             "pairs; it has input_ids.shape[0] examples.")
        return self.input_ids.shape[0] // 2

    def shifted_labels(self) -> tuple[Tensor, Tensor]:
        """Labels aligned with the prediction positions ``[:, :-1]``.

        Returns:
            ``(labels, response_mask)``, both ``(2B, T-1)``; ``labels`` has 0 (a valid id) where the
            response mask is False so it can be used with ``gather`` directly.
        """
        labels = self.labels[:, 1:]
        response_mask = labels != IGNORE_INDEX
        return labels.masked_fill(~response_mask, 0), response_mask

    def shifted_token_weights(self) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """Span weights aligned with :meth:`shifted_labels`: column ``t`` is the weight of label ``t + 1``.

        Returns:
            ``(token_weights[:, 1:], token_weighted[:, 1:])``, both ``(2B, T-1)``, or ``(None, None)`` when the
            batch carries no span weights.
        """
        if self.token_weights is None or self.token_weighted is None:
            return None, None
        return self.token_weights[:, 1:], self.token_weighted[:, 1:]


@dataclass
class TokenStats:
    """Per-token statistics of 2B responses, all ``(2B, T-1)``, float32, zero outside the response.

    Only what an objective uses is needed: DPO, IPO and DPOP read ``policy_logps`` and ``reference_logps``;
    SimPO reads ``policy_logps`` only (``TokenStats(policy_logps=p, response_mask=m)``); TDPO and SparsePO also
    read ``kl``. An objective given statistics without a field it needs raises and names it.

    Attributes:
        policy_logps: ``log π_θ(y^t | x, y^<t)`` of the label token.
        reference_logps: ``log π_ref(y^t | x, y^<t)`` (no gradient), or None.
        kl: ``KL(π_ref ‖ π_θ)`` over the full vocabulary at that position, stored positive (docs/method.md,
            Notation), or None.
        response_mask: bool, True on response tokens (labels != -100 after the shift); keyword-only.
        distribution: the full-distribution statistics the objective and masker declared
            (``distributions.DistributionStatistic``), by name, each ``(2B, T-1)``; keyword-only, empty by default.
        variant_logps: per prompt variant the method declared (``prompt_variants.py``),
            ``log π(y^t | x_variant, y^<t)`` of the same label token under the model the method names (the frozen
            reference or the policy), without gradient, ``(2B, T-1)`` aligned with ``policy_logps``; keyword-only,
            empty by default.
    """

    policy_logps: Tensor
    reference_logps: Tensor | None = None
    kl: Tensor | None = None
    response_mask: Tensor = field(kw_only=True)
    distribution: dict[str, Tensor] = field(default_factory=dict, kw_only=True)
    variant_logps: dict[str, Tensor] = field(default_factory=dict, kw_only=True)

    def require(self, *names: str, by: str) -> None:
        """Raise a ``ValueError`` naming the fields among ``names`` that are None (``by``: who needs them)."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{by} needs TokenStats.{' and TokenStats.'.join(missing)}; got None.")

    @property
    def log_ratio(self) -> Tensor:
        """``ρ^t = log π_θ − log π_ref`` per token, ``(2B, T-1)``, zero outside the response."""
        self.require("reference_logps", by="the log-ratio ρ")
        return self.policy_logps - self.reference_logps

    @property
    def num_pairs(self) -> int:
        return self.policy_logps.shape[0] // 2

    @staticmethod
    def cat(chosen: TokenStats, rejected: TokenStats) -> TokenStats:
        """Stack separately computed chosen (B, T) and rejected (B, T) statistics into the 2B layout.

        Both must have the same number of columns (pad with zeros / False beforehand) and the same fields set.
        """
        def both(name: str) -> Tensor | None:
            first, second = getattr(chosen, name), getattr(rejected, name)
            if (first is None) != (second is None):
                raise ValueError(f"TokenStats.cat: {name} is set on one side only.")
            return None if first is None else torch.cat([first, second])

        def both_dicts(name: str) -> dict[str, Tensor]:
            first, second = getattr(chosen, name), getattr(rejected, name)
            if first.keys() != second.keys():
                raise ValueError(f"TokenStats.cat: the two sides hold different {name} keys.")
            return {k: torch.cat([v, second[k]]) for k, v in first.items()}

        return TokenStats(policy_logps=both("policy_logps"), reference_logps=both("reference_logps"),
                          kl=both("kl"), response_mask=both("response_mask"), distribution=both_dicts("distribution"),
                          variant_logps=both_dicts("variant_logps"))


@dataclass
class TokenMasks:
    """Per-token weights of the reward term (``m_u``) and of the KL term (``m_d``), ``(2B, T-1)`` float32.

    Common or independent by construction: ``TokenMasks(reward=m, kl=m)`` (one tensor for both, one network,
    docs/method.md §1.2) is a common mask, whose L1 coefficients SparsePO halves; two different tensors are
    independent masks. ``common`` is read from the tensors when not given, and a ``common`` that contradicts
    them raises.

    Attributes:
        reward: ``m_u``, zero outside the response.
        kl: ``m_d``, zero outside the response.
        common: True when ``kl`` is the very same mask as ``reward`` (the same tensor or a view of the same
            memory); None (default) reads it from the tensors.
        learned: True when the masks carry gradient to trainable parameters (L1 penalties only matter then,
            but they are applied whenever their coefficient is non-zero).
    """

    reward: Tensor
    kl: Tensor
    common: bool | None = None
    learned: bool = False

    def __post_init__(self) -> None:
        same = self.kl is self.reward or (
            self.kl.data_ptr() == self.reward.data_ptr() and self.kl.shape == self.reward.shape
            and self.kl.stride() == self.reward.stride())
        if self.common is None:
            self.common = same
        elif self.common != same:
            raise ValueError(
                f"TokenMasks(common={self.common}) but reward and kl are {'one' if same else 'two different'} "
                f"tensor{'' if same else 's'}. A common mask is one tensor passed as both reward and kl; leave "
                "`common` unset to read it from the tensors.")

    @staticmethod
    def ones_like(response_mask: Tensor) -> TokenMasks:
        """Mask ≡ 1 on the response (TDPO1 weighting), common."""
        ones = response_mask.float()
        return TokenMasks(reward=ones, kl=ones, learned=False)


@dataclass
class LossOutput:
    """What every objective returns: per-pair tensors of shape ``(B,)``; the caller reduces. (BCO on a batch of N
    unpaired examples returns per-example tensors ``(N,)`` instead; ``losses.bco_loss`` says what they hold.)

    Attributes:
        loss: per-pair loss including any penalty.
        logit: the argument of ``−log σ(·)`` (or of IPO's square), i.e. the implicit reward margin the loss acts on.
        chosen_reward: implicit reward of the chosen response, detached. For DPO, TDPO1 and SparsePO
            ``chosen_reward − rejected_reward == logit`` (fixing the sign of docs/method.md §1.3); each loss's
            docstring says how its rewards relate to its logit.
        rejected_reward: implicit reward of the rejected response, detached.
        penalty: the mask L1 part of ``loss`` (zeros for objectives without one).
    """

    loss: Tensor
    logit: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    penalty: Tensor


@dataclass
class StepRecord:
    """Everything one step computed, detached, for callbacks to observe (never to change the loss).

    ``PreferenceModule.last_step`` holds the record of the latest train/val/test batch; it is replaced every
    step, so a callback reads it in its ``on_*_batch_end`` hook.

    Attributes:
        stage: ``train``, ``val`` or ``test``.
        batch: the input batch (``(2B, T)``, chosen rows first; ``(N, T)`` when ``batch.desirable`` is set: unpaired
            examples, which pair-shaped statistics must skip).
        stats: per-token statistics ``(2B, T-1)`` (labels shifted: position t scores token t+1).
        masks: the masks the loss used (ones where a mask is switched off); ``None`` for objectives without masks.
        out: the objective's per-pair outputs ``(B,)`` (per example, ``(N,)``, for unpaired examples).
        metrics: the scalar metrics logged for this batch.
    """

    stage: str
    batch: PreferenceBatch
    stats: TokenStats
    masks: TokenMasks | None
    out: LossOutput
    metrics: dict[str, Tensor]


def scatter_response(values: Tensor, response_mask: Tensor) -> Tensor:
    """Place per-response-token values ``(n,)`` (row-major order) back into a zero tensor shaped like
    ``response_mask`` (``(2B, T-1)``), in the dtype of ``values``: the inverse of ``tensor[response_mask]``."""
    return values.new_zeros(response_mask.shape).masked_scatter(response_mask, values)


_Detachable = TypeVar("_Detachable", "TokenStats", "TokenMasks", "LossOutput")


def detached(value: _Detachable | None) -> _Detachable | None:
    """A copy of a tensor dataclass whose tensors are detached (bools and other fields kept)."""
    if value is None:
        return None
    def detach(v: object) -> object:
        if isinstance(v, dict):
            return {k: detach(x) for k, x in v.items()}
        return v.detach() if isinstance(v, Tensor) else v

    fields = {k: detach(v) for k, v in vars(value).items()}
    return type(value)(**fields)
