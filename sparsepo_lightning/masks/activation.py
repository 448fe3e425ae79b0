"""Activation-based masks from the frozen reference (MaPO, docs/method.md §2), on any HF causal LM.

Deliberate simplification of the released hook set (docs/method.md §2.1): instead of patched model copies with ~10 hook
points per layer, forward hooks are found generically on each decoder block:

- ``mlp``:   input of the MLP output projection (post-activation features), one entry per layer;
- ``attn``:  input of the attention output projection (attention-weighted values), one entry per layer;
- ``resid``: the block output (residual stream), one entry per layer;
- ``logits``: the final logits, one entry. With ``zn_rescale`` its per-token feature mean is exact and cheap:
  ``mean_v(W h + b) = h·mean_v(W) + mean(b)``, so no ``(B, T, V)`` tensor is built.

Each hook reduces its tensor to a per-token mean in float32 *inside the hook* (§8.2); nothing else is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sparsepo_lightning.blocks import decoder_blocks
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks

Group = Literal["mlp", "attn", "resid", "logits"]
Mapping = Literal["zn_rescale", "sigmoid"]

_ATTN_CONTAINERS = ("self_attn", "attn", "attention", "self_attention")
_ATTN_OUTPUTS = ("o_proj", "c_proj", "out_proj", "dense")
_MLP_CONTAINERS = ("mlp", "feed_forward", "ffn")
_MLP_OUTPUTS = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2")


def _find_submodule(block: nn.Module, path: str | None, containers: Sequence[str], outputs: Sequence[str],
                    option: str) -> nn.Module:
    if path is not None:
        return block.get_submodule(path)
    for container in containers:
        parent = getattr(block, container, None)
        for name in outputs if parent is not None else ():
            if isinstance(getattr(parent, name, None), nn.Module):
                return getattr(parent, name)
    raise ValueError(
        f"ActivationMasker: no output projection found in {type(block).__name__} (looked for "
        f"{'/'.join(containers)}.{{{','.join(outputs)}}}). Set `{option}` to its path inside a block, "
        f"e.g. {option}: mlp.down_proj."
    )


def zn_rescale(values: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row z-normalisation then min–max to [0, 1] over the masked positions (docs/method.md §2.2).

    Args:
        values: ``(N, T)`` float32 per-token values.
        mask: ``(N, T)`` bool response mask.
        eps: a range below this is treated as constant.

    Returns:
        ``(N, T)`` in [0, 1], 0 off the mask. Rows with fewer than 2 response tokens or constant values have
        no contrast to rescale; they get 1.0 on every response token (a neutral, TDPO1-like weight) instead of
        the NaN the released code produces (§8.4).
    """
    count = mask.sum(-1, keepdim=True)  # (N, 1)
    mean = (values * mask).sum(-1, keepdim=True) / count.clamp(min=1)
    var = (((values - mean) * mask) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)  # unbiased (N−1)
    z = (values - mean) / (var.sqrt() + 1e-12)
    z_min = z.masked_fill(~mask, torch.inf).amin(-1, keepdim=True)
    z_max = z.masked_fill(~mask, -torch.inf).amax(-1, keepdim=True)
    span = z_max - z_min
    degenerate = (count < 2) | ~(span > eps)  # also catches inf − inf = nan on empty rows
    scaled = (z - z_min) / torch.where(degenerate, torch.ones_like(span), span)
    scaled = torch.where(degenerate, torch.ones_like(scaled), scaled)
    return torch.where(mask, scaled, torch.zeros_like(scaled))


def _feature_mean(tensor: Tensor) -> Tensor:
    return tensor.mean(-1)


def _sigmoid_feature_mean(tensor: Tensor) -> Tensor:
    return torch.sigmoid(tensor).mean(-1)


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return values * mask


@dataclass(frozen=True)
class ActivationMapping:
    """How one hooked activation becomes a per-token mask value (``ActivationMasker(mapping=...)``)."""

    reduce: Callable[[Tensor], Tensor]
    """``(N, T, F) → (N, T)`` per-token reduction over features, applied in float32 inside the hook."""
    rescale: Callable[[Tensor, Tensor], Tensor]
    """``(values (N, T), response_mask (N, T)) → mask values``, 0 off the response."""
    linear_in_logits: bool
    """Whether ``reduce`` of the logits is linear in them, so it can be computed as ``h · mean_v(W)`` without
    building the ``(N, T, V)`` logits."""


MAPPINGS: dict[str, ActivationMapping] = {
    "zn_rescale": ActivationMapping(reduce=_feature_mean, rescale=zn_rescale, linear_in_logits=True),
    "sigmoid": ActivationMapping(reduce=_sigmoid_feature_mean, rescale=_masked, linear_in_logits=False),
}
"""``zn_rescale``: feature mean, then per-response z-norm and min–max (docs/method.md §2.2); ``sigmoid``: feature
mean of ``sigmoid(a)``, no rescaling."""


class ActivationMasker(TokenMasker):
    """MaPO masks: the mean over hook groups of rescaled per-token reference activations, detached, in [0, 1].

    ``m_u = m_d = m`` (always common, no parameters, docs/method.md §2.3).
    """

    def __init__(self, groups: Sequence[Group] = ("mlp", "attn", "resid", "logits"), mapping: Mapping = "zn_rescale",
                 mlp_output_module: str | None = None, attn_output_module: str | None = None) -> None:
        """
        Args:
            groups: which hook groups to average (each group weighs 1/len(groups)).
            mapping: ``zn_rescale`` (per-response z-norm then min–max) or ``sigmoid`` (feature mean of sigmoid(a)).
            mlp_output_module: path of the MLP output projection inside a block, if not found automatically.
            attn_output_module: path of the attention output projection inside a block, if not found automatically.
        """
        super().__init__()
        unknown = set(groups) - {"mlp", "attn", "resid", "logits"}
        if not groups or unknown:
            raise ValueError(f"ActivationMasker: groups must be a non-empty subset of mlp, attn, resid, logits; "
                             f"got {list(groups)}.")
        if mapping not in MAPPINGS:
            raise ValueError(f"ActivationMasker: mapping must be one of {', '.join(map(repr, MAPPINGS))}, "
                             f"got {mapping!r}.")
        self.groups = tuple(dict.fromkeys(groups))
        self.mapping = mapping
        self._mapping = MAPPINGS[mapping]
        self._paths = {"mlp": mlp_output_module, "attn": attn_output_module}
        self._records: dict[str, list[Tensor]] | None = None
        self._handles: list = []

    def _reduce(self, tensor: Tensor) -> Tensor:
        """Per-token feature mean in float32: ``(N, T, F) → (N, T)``; the full tensor is not kept."""
        tensor = tensor.float()
        return self._mapping.reduce(tensor.float())

    def _record(self, group: str, tensor: Tensor) -> None:
        if self._records is not None:
            self._records[group].append(self._reduce(tensor))

    def bind(self, reference: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in decoder_blocks(reference):
            if "mlp" in self.groups:
                proj = _find_submodule(block, self._paths["mlp"], _MLP_CONTAINERS, _MLP_OUTPUTS, "mlp_output_module")
                self._handles.append(proj.register_forward_pre_hook(lambda _m, args: self._record("mlp", args[0])))
            if "attn" in self.groups:
                proj = _find_submodule(block, self._paths["attn"], _ATTN_CONTAINERS, _ATTN_OUTPUTS,
                                       "attn_output_module")
                self._handles.append(proj.register_forward_pre_hook(lambda _m, args: self._record("attn", args[0])))
            if "resid" in self.groups:
                self._handles.append(block.register_forward_hook(
                    lambda _m, _args, out: self._record("resid", out[0] if isinstance(out, tuple) else out)))

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._records = {group: [] for group in self.groups}  # consumed (and cleared) by forward()
        yield

    def _logit_means(self, reference: ReferenceOutputs) -> Tensor:
        """Per-token mean over the vocabulary of the reference logits, ``(N, T)``, without building them."""
        head = reference.head
        hidden = reference.last_hidden.float()
        if self._mapping.linear_in_logits:
            mean = hidden @ head.weight.float().mean(0)  # (N, T): mean_v(W h) = h·mean_v(W)
            return mean if getattr(head, "bias", None) is None else mean + head.bias.float().mean()
        return torch.stack([self._reduce(head(row)) for row in reference.last_hidden])  # one row at a time

    @torch.no_grad()  # MaPO masks are fully detached (docs/method.md §2)
    def forward(self, reference: ReferenceOutputs, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if self._records is None:
            raise RuntimeError("ActivationMasker: run the reference forward inside masker.recording().")
        records, self._records = self._records, None
        if reference.unpack is not None:  # hooks saw the packed rows (data.layout: packed)
            records = {group: [reference.unpack(values) for values in hooked] for group, hooked in records.items()}
        if "logits" in self.groups:
            records["logits"] = [self._logit_means(reference)]
        group_means = []
        for group in self.groups:
            if not records[group]:
                raise RuntimeError(f"ActivationMasker: no '{group}' activation was recorded; were hooks bound?")
            per_hook = [self._map(values[:, :-1], response_mask) for values in records[group]]  # state at t−1
            group_means.append(torch.stack(per_hook).mean(0))
        mask = torch.stack(group_means).mean(0) * response_mask  # (N, T-1)
        return TokenMasks(reward=mask, kl=mask, common=True, learned=False)

    def _map(self, values: Tensor, response_mask: Tensor) -> Tensor:
        return self._mapping.rescale(values, response_mask)
