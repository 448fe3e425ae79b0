"""Per-token log-probabilities and full-vocabulary KL, in float32, over response positions only.

Why this file exists (docs/method.md §8.1): the released code keeps four ``(B, T, V)`` log-softmaxes
plus a reference softmax alive at once. Here the models return only their final hidden states and the LM head
is applied to the *response* positions only, ``chunk_size`` tokens at a time, so neither model's ``(N, V)``
logits survive the forward pass. Two implementations:

- ``fused`` (default): :class:`FusedTokenStats`, a custom autograd function that takes the hidden states and
  the head's weight (and bias) directly, saves only the ``(n, d)`` hidden states, labels and per-token
  log-normalisers, and recomputes each chunk's logits in backward, writing the gradient w.r.t. hidden states
  and head weight itself. Extra memory is ``O(chunk_size · V)``; nothing of size ``(n, V)`` is saved.
- ``checkpoint``: each chunk calls the head *module* under ``torch.utils.checkpoint``. Slower (autograd saves
  and replays the whole chunk graph) but it goes through the module's own forward, so it is the fallback for
  heads the fused path cannot read: FSDP-sharded heads (FSDP2 ``DTensor`` weights, FSDP1 flat parameters,
  gathered only inside the module's forward), LoRA-wrapped or quantised heads. ``auto`` picks it for any head
  that is not a plain ``nn.Linear`` with a regular tensor weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsepo_lightning.fused_head import HeadGradients, head_logits
from sparsepo_lightning.masks.base import FrozenModelOutputs, ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.packing import PackedRows
from sparsepo_lightning.types import PreferenceBatch, TokenMasks, TokenStats, detached, scatter_response

Head = Callable[[Tensor], Tensor]
"""Maps hidden states ``(n, d)`` to logits ``(n, V)`` (an ``nn.Linear`` LM head, possibly tied)."""

Implementation = Literal["auto", "fused", "checkpoint"]


def output_head(model: nn.Module) -> Head:
    """The LM head of a Hugging Face causal LM, checked to be usable on hidden states alone.

    Raises:
        ValueError: if the model post-processes logits (soft-capping, logit scaling), which the head
            alone would not reproduce.
    """
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if config is not None and getattr(config, attr, None) not in (None, 1.0):
            raise ValueError(
                f"{type(model).__name__} sets config.{attr}={getattr(config, attr)}; sparsepo_lightning applies "
                "the LM head to hidden states directly and does not support post-processed logits yet."
            )
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None).")
    return head


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, all_layers: bool = False,
    packed: PackedRows | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Run the decoder body of a HF causal LM without its LM head.

    Args:
        input_ids, attention_mask: ``(N, T)`` padded-layout rows.
        packed: the batch's packed layout (``packing.PackedRows``): the model runs on its rows instead, with its
            4D block mask and position ids, and the outputs are gathered back into the ``(N, T)`` layout.

    Returns:
        ``(last_hidden, layers)``: ``last_hidden`` is ``(N, T, d)`` (after the final norm); ``layers`` is the
        tuple of the L block outputs (embedding output dropped, docs/method.md §3.1) when ``all_layers``, else None.
    """
    if packed is None:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        back = lambda hidden: hidden  # noqa: E731
    else:
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                  "attention_mask": packed.attention_mask(model.config._attn_implementation)}
        back = functools.partial(packed.unpack, attention_mask=attention_mask)
    out = model.base_model(**inputs, output_hidden_states=all_layers, use_cache=False)
    layers = tuple(back(h) for h in out.hidden_states[1:]) if all_layers else None
    return back(out.last_hidden_state), layers


def reference_outputs(reference: nn.Module, input_ids: Tensor, attention_mask: Tensor, masker: TokenMasker | None,
                      inference: bool, context: AbstractContextManager | None = None,
                      packed: PackedRows | None = None) -> ReferenceOutputs:
    """The frozen reference's forward for one batch, as maskers receive it (no gradient).

    Args:
        reference: the reference causal LM (with LoRA: the policy, run inside ``context`` = adapters disabled).
        masker: asks for all block outputs (``needs_layers``) or records activations (``recording``) on the way.
        inference: ``torch.inference_mode`` (a separate frozen reference: no autograd bookkeeping at all; its
            outputs are only read by ops that save nothing of them for backward) instead of ``no_grad``. Use
            ``no_grad`` for the LoRA adapter-off reference (the policy itself, maybe gradient-checkpointed) and
            under FSDP2 (parameters unsharded inside inference_mode would be inference tensors, and the head,
            called again outside it for the statistics, could not refill them).
        packed: run on the batch's packed layout (``final_hidden_states``); maskers get ``ReferenceOutputs.unpack``
            to bring what their hooks recorded back into the padded layout.
    """
    needs_layers = masker is not None and masker.needs_layers
    recording = masker.recording() if masker is not None else nullcontext()
    frozen = torch.inference_mode() if inference else torch.no_grad()
    with frozen, context or nullcontext(), recording:
        last, layers = final_hidden_states(reference, input_ids, attention_mask, needs_layers, packed)
    unpack = None if packed is None else functools.partial(packed.unpack, attention_mask=attention_mask)
    return ReferenceOutputs(last_hidden=last, layers=layers, head=output_head(reference), unpack=unpack)


def frozen_outputs(models: dict[str, nn.Module], input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   response_mask: Tensor, chunk_size: int, inference: bool,
                   packed: PackedRows | None = None) -> dict[str, FrozenModelOutputs]:
    """Label log-probs and final hidden states of extra frozen models (``PreferenceModule(frozen_models=...)``),
    no gradient, LM head on response positions only (chunked, as ``token_stats``).

    Args:
        models: the frozen causal LMs by name (those the masker asked for).
        labels: ``(N, T-1)`` shifted labels; response_mask: ``(N, T-1)`` bool.
        inference: ``torch.inference_mode`` (unsharded models) instead of ``no_grad`` (FSDP2-sharded models).
        packed: run on the batch's packed layout (``final_hidden_states``).
    """
    outputs = {}
    with torch.inference_mode() if inference else torch.no_grad():
        for name, model in models.items():
            last, _ = final_hidden_states(model, input_ids, attention_mask, packed=packed)
            head = output_head(model)
            stats = token_stats(last, labels, response_mask, head, with_kl=False, chunk_size=chunk_size,
                                implementation="checkpoint")
            outputs[name] = FrozenModelOutputs(logps=stats.policy_logps, last_hidden=last, head=head)
    return outputs


def step_masks(masker: TokenMasker, frozen_models: nn.ModuleDict | None, batch: PreferenceBatch, stats: TokenStats,
               reference: ReferenceOutputs | None, chunk_size: int, inference: bool,
               frozen: dict[str, FrozenModelOutputs] | None = None) -> TokenMasks:
    """The masker's masks for one step. A masker taking a ``context`` gets a ``TokenContext``: the batch, the
    detached statistics and the outputs of the extra frozen models it names (``masker.frozen_model_names()``),
    taken from ``frozen`` when the step has run them already."""
    response_mask = stats.response_mask  # the step's own, not shifted again here
    if not masker.takes_context:
        return masker(reference, response_mask)
    names = masker.frozen_model_names()
    if frozen is not None and set(names) <= frozen.keys():
        frozen = {name: frozen[name] for name in names}
    else:
        frozen = {} if not names else frozen_outputs({name: frozen_models[name] for name in names}, batch.input_ids,
                                                     batch.attention_mask, batch.shifted_labels()[0],
                                                     response_mask, chunk_size, inference, batch.packed)
    return masker(reference, response_mask, TokenContext(response_mask, batch, detached(stats), reference, frozen))


def linear_head_params(head: Head, hidden_size: int) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` of a plain ``nn.Linear`` head the fused path can use directly, else None.

    None for anything whose forward is more than ``h @ W.T + b`` on a full local weight: subclasses (LoRA,
    quantised layers), FSDP2 ``DTensor`` weights, FSDP1 flat-parameter shards (wrong shape outside forward).
    """
    if type(head) is not nn.Linear:
        return None
    weight, bias = head.weight, head.bias
    if type(weight.data) is not Tensor or weight.dim() != 2 or weight.shape[1] != hidden_size:
        return None
    return weight, bias


def _log_normaliser(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, dim=-1)  # (c,)


class FusedTokenStats(torch.autograd.Function):
    """Label log-probs of policy and reference and KL(π_ref‖π_θ) for ``n`` response tokens, chunked, fp32.

    ``forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunk_size, with_kl)`` returns
    ``(policy_logps, reference_logps, kl)``, each ``(n,)`` float32. Gradients flow to ``hidden``, ``weight``
    and ``bias`` only; the reference is a constant (its inputs get no gradient). Saved for backward: the
    ``(n, d)`` hidden states of both models, the labels and the two ``(n,)`` log-normalisers — never logits.

    Backward recomputes each chunk's logits and uses, with ``g`` the incoming gradient of the label log-prob
    and ``k`` that of the KL (``p``: policy softmax, ``q``: reference softmax, ``e_y``: one-hot label)::

        ∂/∂z [g·log p_y + k·Σ_v q_v (log q_v − log p_v)] = g·(e_y − p) + k·(p − q)

    then ``∂h = ∂z @ W`` and ``∂W += ∂zᵀ @ h`` (accumulated in float32), ``∂b += Σ ∂z``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        labels: Tensor,
        chunk_size: int,
        with_kl: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        policy_lp = hidden.new_zeros(n, dtype=torch.float32)
        reference_lp, kl = torch.zeros_like(policy_lp), torch.zeros_like(policy_lp)
        lse, ref_lse = torch.zeros_like(policy_lp), torch.zeros_like(policy_lp)
        with_ref = ref_hidden is not None and ref_weight is not None
        for start in range(0, n, chunk_size):
            chunk = slice(start, start + chunk_size)
            label = labels[chunk, None]
            logits = head_logits(hidden[chunk], weight, bias)  # (c, V)
            lse[chunk] = _log_normaliser(logits)
            policy_lp[chunk] = logits.gather(-1, label).squeeze(-1) - lse[chunk]
            if not with_ref:
                continue
            ref_logits = head_logits(ref_hidden[chunk], ref_weight, ref_bias)  # (c, V)
            ref_lse[chunk] = _log_normaliser(ref_logits)
            reference_lp[chunk] = ref_logits.gather(-1, label).squeeze(-1) - ref_lse[chunk]
            if with_kl:  # in place on the two (c, V) buffers: no third one
                ref_logits.sub_(ref_lse[chunk, None])  # log q
                logits.sub_(lse[chunk, None]).sub_(ref_logits)  # log p − log q
                # KL = Σ_v q (log q − log p) ≥ 0 (docs/method.md, Notation); log-softmax form avoids 0·(−inf).
                kl[chunk] = -logits.mul_(ref_logits.exp_()).sum(-1)
        ctx.chunk_size, ctx.with_kl = chunk_size, with_kl and with_ref
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, ref_hidden if ctx.with_kl else None,
                              ref_weight if ctx.with_kl else None, ref_bias if ctx.with_kl else None,
                              labels, lse, ref_lse)
        ctx.mark_non_differentiable(reference_lp)
        return policy_lp, reference_lp, kl

    @staticmethod
    def backward(ctx: Any, grad_lp: Tensor, _grad_ref: Tensor, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse = ctx.saved_tensors
        grads = HeadGradients(ctx.needs_input_grad, hidden, weight)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            g, k = grad_lp[chunk, None].float(), grad_kl[chunk, None].float()  # (c, 1)
            grad_z = head_logits(hidden[chunk], weight, bias).sub_(lse[chunk, None]).exp_()  # p, (c, V)
            grad_z.mul_(k - g if ctx.with_kl else -g)  # (k − g)·p
            grad_z.scatter_add_(-1, labels[chunk, None], g)  # + g·e_y
            if ctx.with_kl:
                ref_p = head_logits(ref_hidden[chunk], ref_weight, ref_bias).sub_(ref_lse[chunk, None]).exp_()
                grad_z.addcmul_(ref_p, k, value=-1.0)  # − k·q
                del ref_p
            grads.add(chunk, grad_z.to(weight.dtype), hidden, weight)
        return *grads.result(weight, bias), None, None, None, None, None, None


def _chunk_stats(
    policy_hidden: Tensor,
    reference_hidden: Tensor | None,
    labels: Tensor,
    policy_head: Head,
    reference_head: Head | None,
    with_kl: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Checkpoint path: label log-probs of both models and KL(π_ref‖π_θ) for one chunk, through the head modules."""
    policy_lp = F.log_softmax(policy_head(policy_hidden).float(), dim=-1)  # (n, V)
    policy_label_lp = policy_lp.gather(-1, labels[:, None]).squeeze(-1)  # (n,)
    zeros = policy_label_lp.new_zeros(policy_label_lp.shape)
    if reference_hidden is None or reference_head is None:
        return policy_label_lp, zeros, zeros
    with torch.no_grad():
        reference_lp = F.log_softmax(reference_head(reference_hidden).float(), dim=-1)  # (n, V)
        reference_label_lp = reference_lp.gather(-1, labels[:, None]).squeeze(-1)
    if not with_kl:
        return policy_label_lp, reference_label_lp, zeros
    # KL(π_ref‖π_θ) = Σ_v p_ref (log p_ref − log p_θ) ≥ 0 (docs/method.md, Notation); log_softmax avoids 0·(−inf).
    kl = (reference_lp.exp() * (reference_lp - policy_lp)).sum(-1)
    return policy_label_lp, reference_label_lp, kl


def chunk_starts(num_tokens: int, chunk_size: int, head: Head) -> range:
    """Start offsets of the LM-head chunks of one step. With an FSDP2-sharded head every head call is a collective,
    so all ranks must make the same number of calls: the count is the largest over the ranks (one small
    all-reduce), and a rank with fewer tokens calls the head on empty chunks (``tensor[start:end]`` past the end)."""
    count = -(-num_tokens // chunk_size)
    if _is_sharded(head) and torch.distributed.is_initialized():
        most = torch.tensor([count], device=_device_of(head))
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        count = int(most)  # a host sync, only under sharding (the boolean response selection has synced already)
    return range(0, max(count, 1) * chunk_size, chunk_size)


def _is_sharded(head: Head) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule)


def _device_of(head: Head) -> torch.device:
    weight = getattr(head, "weight", None)
    device = getattr(weight, "device", torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device


def _checkpointed_stats(policy_sel: Tensor, reference_sel: Tensor | None, label_sel: Tensor, policy_head: Head,
                        reference_head: Head | None, with_kl: bool, chunk_size: int) -> list[Tensor]:
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in chunk_starts(label_sel.shape[0], chunk_size, policy_head):
        chunk = slice(start, start + chunk_size)
        ref_chunk = None if reference_sel is None else reference_sel[chunk]
        args = (policy_sel[chunk], ref_chunk, label_sel[chunk], policy_head, reference_head, with_kl)
        if torch.is_grad_enabled() and policy_sel.requires_grad:
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    if not parts:  # no response token in the whole batch: keep the graph connected with zero-sized tensors
        return [policy_sel.new_zeros(0, dtype=torch.float32) for _ in range(3)]
    return [torch.cat(values) for values in zip(*parts, strict=True)]


def token_stats(
    policy_hidden: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    policy_head: Head,
    reference_hidden: Tensor | None = None,
    reference_head: Head | None = None,
    with_kl: bool = True,
    chunk_size: int = 1024,
    implementation: Implementation = "auto",
) -> TokenStats:
    """Per-token statistics from final hidden states, response positions only, chunked.

    Args:
        policy_hidden: ``(N, T, d)`` final hidden states of the policy for the full rows.
        labels: ``(N, T-1)`` shifted labels (``PreferenceBatch.shifted_labels()``), any valid id off-response.
        response_mask: ``(N, T-1)`` bool, True where column ``t`` predicts a response token.
        policy_head: LM head of the policy.
        reference_hidden: ``(N, T, d)`` final hidden states of the reference (treated as a constant), or None
            for reference-free objectives (reference log-probs and KL are then zeros).
        reference_head: LM head of the reference.
        with_kl: compute the full-vocabulary KL (needed by TDPO/SparsePO only).
        chunk_size: response tokens per LM-head call; extra memory is ``O(chunk_size · V)`` float32.
        implementation: ``fused`` (:class:`FusedTokenStats`), ``checkpoint`` (head modules under activation
            checkpointing, the fallback for FSDP-sharded or wrapped heads) or ``auto`` (fused when both heads
            are plain ``nn.Linear`` layers with local weights).

    Returns:
        TokenStats with ``(N, T-1)`` float32 tensors, zero outside the response.

    Raises:
        ValueError: bad ``chunk_size`` or ``implementation``, or ``fused`` requested for a head it cannot read.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if implementation not in ("auto", "fused", "checkpoint"):
        raise ValueError(f"implementation must be 'auto', 'fused' or 'checkpoint', got {implementation!r}.")
    policy_sel = policy_hidden[:, :-1][response_mask]  # (n_resp, d), row-major order
    reference_sel = None if reference_hidden is None else reference_hidden[:, :-1][response_mask]
    label_sel = labels[response_mask]  # (n_resp,)
    fused_params = None
    if implementation != "checkpoint":
        d = policy_hidden.shape[-1]
        policy_params = linear_head_params(policy_head, d)
        reference_params = (None, None) if reference_head is None else linear_head_params(reference_head, d)
        if policy_params is not None and reference_params is not None:
            fused_params = (*policy_params, *reference_params)
        elif implementation == "fused":
            raise ValueError("implementation='fused' needs plain nn.Linear LM heads with local (unsharded) weights; "
                             "use implementation='checkpoint' (or 'auto') for sharded or wrapped heads.")
    if fused_params is not None:
        weight, bias, ref_weight, ref_bias = fused_params
        with_ref = reference_sel is not None and ref_weight is not None
        flat = FusedTokenStats.apply(policy_sel, weight, bias, reference_sel if with_ref else None,
                                     ref_weight if with_ref else None, ref_bias if with_ref else None,
                                     label_sel, chunk_size, with_kl)
    else:
        flat = _checkpointed_stats(policy_sel, reference_sel, label_sel, policy_head, reference_head, with_kl,
                                   chunk_size)

    policy_lp, reference_lp, kl = (scatter_response(v.float(), response_mask) for v in flat)
    return TokenStats(policy_logps=policy_lp, reference_logps=reference_lp.detach(), kl=kl, response_mask=response_mask)
