"""Per-token log-probabilities and full-vocabulary KL, in float32, over response positions only.

Why this file exists (method.md §8.1, decision 5): the released code keeps four ``(B, T, V)`` log-softmaxes
plus a reference softmax alive at once. Here the models return only their final hidden states; the LM head
is applied to the *response* positions only, ``chunk_size`` tokens at a time, and every chunk is wrapped in
activation checkpointing, so neither model's ``(N, V)`` logits survive the forward pass: in backward each
chunk is recomputed, used and freed. Peak extra memory is ``O(chunk_size · V)`` instead of ``O(2 · 2B · T · V)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsepo_lightning.types import TokenStats

Head = Callable[[Tensor], Tensor]
"""Maps hidden states ``(n, d)`` to logits ``(n, V)`` (an ``nn.Linear`` LM head, possibly tied)."""


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
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, all_layers: bool = False
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Run the decoder body of a HF causal LM without its LM head.

    Returns:
        ``(last_hidden, layers)``: ``last_hidden`` is ``(N, T, d)`` (after the final norm); ``layers`` is the
        tuple of the L block outputs (embedding output dropped, method.md §3.1) when ``all_layers``, else None.
    """
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers, use_cache=False
    )
    layers = tuple(out.hidden_states[1:]) if all_layers else None
    return out.last_hidden_state, layers


def _chunk_stats(
    policy_hidden: Tensor,
    reference_hidden: Tensor | None,
    labels: Tensor,
    policy_head: Head,
    reference_head: Head | None,
    with_kl: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Label log-probs of both models and KL(π_ref‖π_θ) for one chunk of ``n`` response tokens, float32."""
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
    # KL(π_ref‖π_θ) = Σ_v p_ref (log p_ref − log p_θ) ≥ 0 (method.md decision 2); log_softmax avoids 0·(−inf).
    kl = (reference_lp.exp() * (reference_lp - policy_lp)).sum(-1)
    return policy_label_lp, reference_label_lp, kl


def token_stats(
    policy_hidden: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    policy_head: Head,
    reference_hidden: Tensor | None = None,
    reference_head: Head | None = None,
    with_kl: bool = True,
    chunk_size: int = 1024,
) -> TokenStats:
    """Per-token statistics from final hidden states, response positions only, chunked.

    Args:
        policy_hidden: ``(N, T, d)`` final hidden states of the policy for the full rows.
        labels: ``(N, T-1)`` shifted labels (``PreferenceBatch.shifted_labels()``), any valid id off-response.
        response_mask: ``(N, T-1)`` bool, True where column ``t`` predicts a response token.
        policy_head: LM head of the policy.
        reference_hidden: ``(N, T, d)`` final hidden states of the reference, or None for reference-free
            objectives (reference log-probs and KL are then zeros).
        reference_head: LM head of the reference.
        with_kl: compute the full-vocabulary KL (needed by TDPO/SparsePO only).
        chunk_size: response tokens per LM-head call; memory is ``O(chunk_size · V)``.

    Returns:
        TokenStats with ``(N, T-1)`` float32 tensors, zero outside the response.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    policy_sel = policy_hidden[:, :-1][response_mask]  # (n_resp, d), row-major order
    reference_sel = None if reference_hidden is None else reference_hidden[:, :-1][response_mask]
    label_sel = labels[response_mask]  # (n_resp,)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, label_sel.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        ref_chunk = None if reference_sel is None else reference_sel[chunk]
        args = (policy_sel[chunk], ref_chunk, label_sel[chunk], policy_head, reference_head, with_kl)
        if torch.is_grad_enabled() and policy_sel.requires_grad:
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    if parts:
        flat = [torch.cat(values) for values in zip(*parts, strict=True)]
    else:  # no response token in the whole batch: keep the graph connected with zero-sized tensors
        flat = [policy_sel.new_zeros(0, dtype=torch.float32) for _ in range(3)]

    def scatter(values: Tensor) -> Tensor:
        out = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
        return out.masked_scatter(response_mask, values)

    policy_lp, reference_lp, kl = (scatter(v) for v in flat)
    return TokenStats(policy_logps=policy_lp, reference_logps=reference_lp.detach(), kl=kl, response_mask=response_mask)
