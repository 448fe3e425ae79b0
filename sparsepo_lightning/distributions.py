"""Full-distribution statistics: per-token functions of whole next-token distributions, computed chunk by chunk.

``logprobs.token_stats`` gives the label log-probs and KL(π_ref‖π_θ). A method that needs another function of
the full distributions at each response position — an entropy, a divergence to a teacher built from frozen
models — declares it here instead: a :class:`DistributionStatistic` that maps one chunk of float32 logits
(policy, reference, extra frozen models; :class:`ChunkLogits`) to one value per token. Maskers and objectives
list theirs in ``distribution_statistics()``; the module computes them every step with :func:`distribution_stats`
and hands them over in ``TokenStats.distribution`` (objectives, with gradient) and ``context.stats.distribution``
(maskers, detached); ``distribution_step.py`` is that wiring. docs/full-distribution.md walks through writing one.

How it is computed is :class:`FusedDistributionStats` (plain ``nn.Linear`` heads): the same chunked pass as
``logprobs.FusedTokenStats`` — the LM heads are applied to ``chunk_size`` response positions at a time, only the
``(n, d)`` hidden states are saved for backward, each chunk's logits are rebuilt in backward and the gradient
w.r.t. the policy's logits is turned into gradients of its hidden states and head weight. Nothing of size
``(n, V)`` is saved; the extra memory is that of the statistic on one ``(chunk_size, V)`` chunk. Under FSDP or with
wrapped heads the same chunks go through the head *modules* under activation checkpointing, with the chunk count
agreed across ranks (``logprobs.chunk_starts``), as the KL path does. Values are exact under the packed layout
(hidden states come back in the padded layout), gradient accumulation and data parallelism: every value is a
function of one position's distributions only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sparsepo_lightning.fused_head import HeadGradients, head_logits
from sparsepo_lightning.logprobs import (
    Head,
    Implementation,
    chunk_starts,
    linear_head_params,
)
from sparsepo_lightning.types import scatter_response

POLICY, REFERENCE = "policy", "reference"
"""Names of the policy's and the reference's logits in :class:`ChunkLogits`; extra frozen models use their
``model.frozen_models`` name."""


class ChunkLogits:
    """The float32 logits ``(c, V)`` of every model a statistic reads, for ``c`` response positions.

    ``logits[name]`` builds the logits of ``name`` (``"policy"``, ``"reference"`` or a ``model.frozen_models`` name)
    *each time it is called*: a fresh buffer the caller owns and may overwrite in place (one chunk of several
    models' logits need not be alive at once). The policy's logits are the exception while a generic statistic is
    differentiated (they are then the autograd leaf): do not modify them in place.

    Attributes:
        labels: ``(c,)`` label ids at these positions.
    """

    def __init__(self, builders: Mapping[str, Callable[[], Tensor]], labels: Tensor) -> None:
        self._builders, self.labels = builders, labels

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._builders:
            raise KeyError(f"no logits named {name!r} in this pass (it has: {', '.join(self._builders)}); a "
                           "statistic lists the models it reads in reads_reference / frozen_model_names().")
        return self._builders[name]()


class DistributionStatistic:
    """A per-token function of full next-token distributions: ``statistic(logits) -> (c,)`` float32.

    Subclasses implement :meth:`__call__` with differentiable torch operations on ``logits["policy"]`` (autograd
    then differentiates it per chunk in backward), or also :meth:`policy_grad`, a closed-form gradient that may
    work in place (for the statistics on the training path, where the ``(c, V)`` buffers are the memory).

    Attributes:
        reads_reference: the statistic reads ``logits["reference"]`` (the objective or masker must then load the
            reference: ``needs_reference``).
        reads_policy: the statistic reads ``logits["policy"]``.
    """

    reads_reference: bool = False
    reads_policy: bool = True
    """Whether the value depends on ``logits["policy"]`` (False: no gradient is computed for it)."""

    def frozen_model_names(self) -> tuple[str, ...]:
        """Names of the extra frozen models (``model.frozen_models``) whose logits it reads."""
        return ()

    def __call__(self, logits: ChunkLogits) -> Tensor:
        raise NotImplementedError

    def policy_grad(self, logits: ChunkLogits, grad: Tensor) -> Tensor | None:
        """``Σ_t grad_t · ∂ value_t / ∂ z_policy`` for one chunk, ``(c, V)`` float32, or None to let autograd
        differentiate :meth:`__call__` (the default). ``grad``: ``(c,)`` incoming gradient of the values."""
        return None


Models = dict[str, tuple[Tensor, Head]]
"""Per model name: ``(hidden, head)``, hidden ``(N, T, d)`` final hidden states in the padded layout."""


def distribution_stats(
    statistics: Mapping[str, DistributionStatistic],
    policy_hidden: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    policy_head: Head,
    others: Models | None = None,
    chunk_size: int = 1024,
    implementation: Implementation = "auto",
) -> dict[str, Tensor]:
    """Every statistic at every response position, chunked, float32.

    Args:
        statistics: by name (the key of the result).
        policy_hidden: ``(N, T, d)`` final hidden states of the policy; gradients flow to it (and to the policy
            head's parameters) from statistics that read the policy. Pass it detached for values only.
        labels: ``(N, T-1)`` shifted labels; response_mask: ``(N, T-1)`` bool.
        policy_head: the policy's LM head.
        others: the reference (``"reference"``) and extra frozen models the statistics read, as
            ``(hidden, head)``; treated as constants.
        chunk_size: response positions per LM-head call (memory ``O(chunk_size · V)`` per model read).
        implementation: ``fused`` (:class:`FusedDistributionStats`), ``checkpoint`` (head modules under activation
            checkpointing: FSDP-sharded or wrapped heads) or ``auto`` (fused when every head is a plain local
            ``nn.Linear``).

    Returns:
        By statistic name, ``(N, T-1)`` float32 tensors, zero outside the response.
    """
    if not statistics:
        return {}
    others = dict(others or {})
    needed = _models_read(statistics)
    missing = needed - {POLICY, *others}
    if missing:
        raise ValueError(f"distribution_stats: the statistics read {', '.join(sorted(missing))}, which were not "
                         "passed in `others`.")
    names = tuple(sorted(needed - {POLICY}))
    hidden_sel = policy_hidden[:, :-1][response_mask]  # (n, d)
    other_sel = [others[name][0][:, :-1][response_mask] for name in names]
    heads = [others[name][1] for name in names]
    label_sel = labels[response_mask]
    stats = tuple(statistics.values())
    params = None if implementation == "checkpoint" else _fused_params(policy_head, heads, policy_hidden.shape[-1])
    if params is None and implementation == "fused":
        raise ValueError("implementation='fused' needs plain nn.Linear LM heads with local (unsharded) weights; "
                         "use 'checkpoint' (or 'auto') for sharded or wrapped heads.")
    if params is not None:
        values = FusedDistributionStats.apply(hidden_sel, *params[0], label_sel, chunk_size, stats, names,
                                              *other_sel, *(t for p in params[1:] for t in p))
    else:
        values = _checkpointed(stats, names, hidden_sel, other_sel, label_sel, policy_head, heads, chunk_size)
    return {name: scatter_response(v, response_mask) for name, v in zip(statistics, values.unbind(0), strict=True)}


def _models_read(statistics: Mapping[str, DistributionStatistic]) -> set[str]:
    needed = {POLICY}
    for stat in statistics.values():
        needed |= set(stat.frozen_model_names()) | ({REFERENCE} if stat.reads_reference else set())
    return needed


def _fused_params(policy_head: Head, heads: list[Head], d: int) -> list[tuple[Tensor, Tensor | None]] | None:
    params = [linear_head_params(head, d) for head in (policy_head, *heads)]
    return None if any(p is None for p in params) else params  # type: ignore[return-value]


def _builders(names: tuple[str, ...], policy: Callable[[], Tensor],
              others: list[Callable[[], Tensor]]) -> dict[str, Callable[[], Tensor]]:
    return {POLICY: policy, **dict(zip(names, others, strict=True))}


class FusedDistributionStats(torch.autograd.Function):
    """``k`` full-distribution statistics of ``n`` response positions, chunked, float32, fused with the LM heads.

    ``forward(hidden, weight, bias, labels, chunk_size, statistics, names, *other_hidden, *other_weight_bias)``
    returns ``(k, n)`` values. Gradients flow to the policy's ``hidden``, ``weight`` and ``bias`` only. Saved for
    backward: the ``(n, d)`` hidden states of every model read and the labels — never logits. Backward rebuilds each
    chunk's logits and gets ``∂z = Σ_s g_s · ∂s/∂z`` from each statistic (its :meth:`DistributionStatistic.policy_grad`,
    else autograd on the chunk), then ``∂h = ∂z @ W``, ``∂W += ∂zᵀ @ h`` (float32), ``∂b += Σ ∂z``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_size: int,
                statistics: tuple[DistributionStatistic, ...], names: tuple[str, ...],
                *others: Tensor | None) -> Tensor:
        other_hidden, other_params = others[:len(names)], others[len(names):]
        values = hidden.new_zeros(len(statistics), hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = _chunk_logits(chunk, hidden, weight, bias, labels, names, other_hidden, other_params)
            for i, stat in enumerate(statistics):
                values[i, chunk] = stat(logits).float()
        ctx.chunk_size, ctx.statistics, ctx.names = chunk_size, statistics, names
        ctx.save_for_backward(hidden, weight, bias, labels, *others)
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, *others = ctx.saved_tensors
        names = ctx.names
        other_hidden, other_params = others[:len(names)], others[len(names):]
        grads = HeadGradients(ctx.needs_input_grad, hidden, weight)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            logits = _chunk_logits(chunk, hidden, weight, bias, labels, names, other_hidden, other_params)
            grad_z = _policy_logit_grad(ctx.statistics, logits, grad_values[:, chunk].float())
            if grad_z is None:
                continue
            grads.add(chunk, grad_z.to(weight.dtype), hidden, weight)
        return (*grads.result(weight, bias), None, None, None, None, *(None for _ in others))


def _chunk_logits(chunk: slice, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                  names: tuple[str, ...], other_hidden: list[Tensor], other_params: list[Tensor | None]) -> ChunkLogits:
    """Lazy builders of one chunk's logits from the fused path's hidden states and head weights."""
    def build(h: Tensor, w: Tensor, b: Tensor | None) -> Callable[[], Tensor]:
        def logits() -> Tensor:
            with torch.no_grad():  # constants, also while backward differentiates a statistic
                return head_logits(h[chunk], w, b)
        return logits

    others = [build(h, other_params[2 * i], other_params[2 * i + 1]) for i, h in enumerate(other_hidden)]
    return ChunkLogits(_builders(names, build(hidden, weight, bias), others), labels[chunk])


def _policy_logit_grad(statistics: tuple[DistributionStatistic, ...], logits: ChunkLogits,
                       grad_values: Tensor) -> Tensor | None:
    """``Σ_s g_s · ∂s/∂z_policy`` for one chunk (``grad_values``: ``(k, c)``), or None when no statistic reads the
    policy."""
    total = None
    for stat, grad in zip(statistics, grad_values, strict=True):
        if not stat.reads_policy:
            continue
        grad_z = stat.policy_grad(logits, grad)
        if grad_z is None:
            policy = logits[POLICY].requires_grad_()
            wrapped = ChunkLogits({**logits._builders, POLICY: lambda policy=policy: policy}, logits.labels)
            with torch.enable_grad():
                value = stat(wrapped)
            (grad_z,) = torch.autograd.grad(value, policy, grad)
        total = grad_z if total is None else total.add_(grad_z)
    return total


def _chunk_values(statistics: tuple[DistributionStatistic, ...], names: tuple[str, ...], hidden: Tensor,
                  labels: Tensor, policy_head: Head, heads: list[Head], *other_hidden: Tensor) -> Tensor:
    """Checkpoint path: the ``(k, c)`` values of one chunk through the head modules (frozen ones without grad)."""
    policy = policy_head(hidden).float()

    def frozen(head: Head, h: Tensor) -> Callable[[], Tensor]:
        def build() -> Tensor:
            with torch.no_grad():
                return head(h).float()
        return build

    logits = ChunkLogits(_builders(names, lambda: policy, [frozen(hd, h) for hd, h in zip(heads, other_hidden,
                                                                                            strict=True)]), labels)
    return torch.stack([(_ClosedFormGrad.apply(policy, stat, logits) if _has_closed_form(stat) else stat(logits))
                        .float() for stat in statistics])


def _has_closed_form(stat: DistributionStatistic) -> bool:
    return stat.reads_policy and type(stat).policy_grad is not DistributionStatistic.policy_grad


class _ClosedFormGrad(torch.autograd.Function):
    """Checkpoint path: a statistic with a closed-form ``policy_grad`` (which may work in place, so autograd cannot
    trace it) as one node ``z_policy → values``."""

    @staticmethod
    def forward(ctx: Any, policy: Tensor, stat: DistributionStatistic, logits: ChunkLogits) -> Tensor:
        ctx.stat, ctx.logits = stat, logits
        ctx.save_for_backward(policy)
        return stat(_own_policy(logits, policy))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (policy,) = ctx.saved_tensors
        return ctx.stat.policy_grad(_own_policy(ctx.logits, policy), grad.float()), None, None


def _own_policy(logits: ChunkLogits, policy: Tensor) -> ChunkLogits:
    """``logits`` whose policy entry is a fresh copy of ``policy`` at each call (the statistic may overwrite it)."""
    return ChunkLogits({**logits._builders, POLICY: lambda: policy.detach().clone()}, logits.labels)


def _checkpointed(statistics: tuple[DistributionStatistic, ...], names: tuple[str, ...], hidden: Tensor,
                  others: list[Tensor], labels: Tensor, policy_head: Head, heads: list[Head],
                  chunk_size: int) -> Tensor:
    parts = []
    for start in chunk_starts(labels.shape[0], chunk_size, policy_head):  # the same count on every rank (FSDP2)
        chunk = slice(start, start + chunk_size)
        args = (statistics, names, hidden[chunk], labels[chunk], policy_head, heads, *(h[chunk] for h in others))
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(checkpoint(_chunk_values, *args, use_reentrant=False))
        else:
            parts.append(_chunk_values(*args))
    return torch.cat(parts, dim=1)


ROW_BLOCK = 64
"""Rows per block in the in-place helpers: their temporaries are ``(64, V)``, not ``(chunk_size, V)``."""


def log_softmax_(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dimension, in place on ``logits`` (returned), ``ROW_BLOCK`` rows at a time."""
    for start in range(0, logits.shape[0], ROW_BLOCK):
        block = logits[start:start + ROW_BLOCK]
        block.sub_(torch.logsumexp(block, -1, keepdim=True))
    return logits


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a[:, v] · b[:, v]`` per row, ``(c, V), (c, V) → (c,)``, without a ``(c, V)`` temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(-1)


class Entropy(DistributionStatistic):
    """Shannon entropy ``H_t = −Σ_v π(v) log π(v)`` of one model's next-token distribution (policy or reference).

    Args:
        model: ``"policy"`` (differentiable) or ``"reference"``.
    """

    def __init__(self, model: str = POLICY) -> None:
        if model not in (POLICY, REFERENCE):
            raise ValueError(f"Entropy: model must be 'policy' or 'reference', got {model!r}.")
        self.model = model
        self.reads_reference, self.reads_policy = model == REFERENCE, model == POLICY

    def __call__(self, logits: ChunkLogits) -> Tensor:
        z = logits[self.model]
        log_p = torch.log_softmax(z, -1)
        return -(log_p.exp() * log_p).sum(-1)
