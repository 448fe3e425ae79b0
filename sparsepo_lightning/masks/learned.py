"""Learned token masks (docs/method.md §3, the released ``SimpleMaskAllLayers``), common or independent."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks, scatter_response

Activation = Literal["relu", "none"]
Init = Literal["ones", "released"]
"""How mask networks start: ``ones`` (every mask exactly 1: SparsePO starts as TDPO1) or ``released`` (the
released code's N(0, ``init_std``) weights, whose masks start near 0 and often dead; see ``MaskNetwork``)."""


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "none": nn.Identity}
"""``layer_activation`` / ``mixer_activation`` name -> module class."""


def _activation(name: Activation) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"MaskNetwork: activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]()


class MaskNetwork(nn.Module):
    """All-layer mask head: shared LayerNorm → per-layer Linear(d→1)+act (+dropout) → bias-free mixer + act.

    ``g_l = LN(h_l)``; ``z_l = drop(act(w_l·g_l + b_l))``; ``m = drop(act(Σ_l v_l z_l))`` (docs/method.md §3.2).
    Output is ≥ 0 with ReLU and unbounded above (parity with the released code). Parameters:
    ``L·(d+1) + L + 2d``. LayerNorm starts at (1, 0); the rest by ``init``:

    - ``ones``: ``w_l = 0``, ``b_l = 1``, ``v_l = 1/L``, so ``z_l = 1`` and ``m = 1`` on every token whatever the
      input (up to the float32 rounding of ``Σ_l 1/L``, below 1e-6): the objective starts at its uniform-mask
      value (SparsePO = TDPO1) at the nominal β, every ReLU is active, and the gradients ``∂m/∂w_l = v_l·g_l``
      (token-dependent) and ``∂m/∂v_l = z_l`` let the network learn which tokens to down-weight. A deviation from
      the released code (docs/method.md).
    - ``released``: ``w_l, v_l ~ N(0, init_std)``, ``b_l = 0`` (the released code). The mixer output is then a
      sum of L small terms of either sign: on SmolLM2-135M the initial masks are 6–95 % exact zeros depending on
      the seed, with means of 0.0004–0.04 (an effective β 20–2000× below the nominal one). Where the mask is 0
      no gradient reaches the network, so such a start can stay dead.
    """

    def __init__(self, num_layers: int, hidden_size: int, layer_norm_eps: float = 1e-5, dropout: float = 0.0,
                 layer_activation: Activation = "relu", mixer_activation: Activation = "relu",
                 init_std: float = 0.02, init: Init = "ones") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))  # w_l, one row per layer
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))  # b_l
        self.mixer_weight = nn.Parameter(torch.empty(num_layers))  # v_l, no bias
        self.layer_act = _activation(layer_activation)
        self.mixer_act = _activation(mixer_activation)
        self.dropout = nn.Dropout(dropout)
        if init == "ones":
            nn.init.zeros_(self.layer_weight)
            nn.init.ones_(self.layer_bias)
            nn.init.constant_(self.mixer_weight, 1.0 / num_layers)
        elif init == "released":
            nn.init.normal_(self.layer_weight, std=init_std)
            nn.init.normal_(self.mixer_weight, std=init_std)
        else:
            raise ValueError(f"MaskNetwork: init must be 'ones' or 'released', got {init!r}.")

    def normalise(self, states: Tensor) -> Tensor:
        """``LN(h_l)`` of ``n`` tokens' reference states ``(n, L, d)`` → ``(n, L, d)`` float32 (call under
        ``torch.autocast(enabled=False)``, as ``forward`` does)."""
        norm = self.norm
        return F.layer_norm(states.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)

    def read_out(self, normed: Tensor) -> Tensor:
        """Mask values ``(n,)`` from normalised states ``(n, L, d)`` (``normalise``)."""
        per_layer = torch.einsum("nld,ld->nl", normed, self.layer_weight.float()) + self.layer_bias.float()
        per_layer = self.dropout(self.layer_act(per_layer))  # (n, L)
        return self.dropout(self.mixer_act(per_layer @ self.mixer_weight.float()))  # (n,)

    def forward(self, states: Tensor) -> Tensor:
        """Mask values for ``n`` tokens from their reference states ``(n, L, d)`` → ``(n,)``, float32."""
        # Masks stay fp32 under AMP, and whatever dtype a wrapper stores the parameters in (FSDP1 mixed precision
        # casts every parameter of a unit to bf16 for the forward; LayerNorm would refuse fp32 input then).
        with torch.autocast(device_type=states.device.type, enabled=False):
            return self.read_out(self.normalise(states))


def _layer_norm_eps(config: object) -> float:
    for name in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps"):
        value = getattr(config, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


def top_k_gate(scores: Tensor, response_mask: Tensor, target: float) -> Tensor:
    """Keep the ``k = max(1, n − round(target·n))`` response tokens of highest score in each row (``n`` its
    response tokens; ``round`` halves to even, so odd lengths at target ½ round either way), with a
    straight-through gradient (docs/sparsity.md).

    Forward: ``g_t = 1`` on the kept tokens, 0 elsewhere (exactly ``n − k`` zeros per response, ties broken by
    position). Backward: ``∂g_t/∂s_t = σ'(s_t − τ)`` with ``τ`` the midpoint between the k-th and (k+1)-th score of
    the row, the gradient of the relaxed gate ``σ(s − τ)`` (straight-through estimator, Bengio et al. 2013).

    Args:
        scores: ``(R, T)`` float32 gate scores (any value outside the response).
        response_mask: ``(R, T)`` bool.
        target: share of zeros in ``[0, 1)``.

    Returns:
        ``(R, T)`` float32 gate, 0 outside the response.
    """
    counts = response_mask.sum(-1, keepdim=True)  # (R, 1)
    keep = torch.clamp(counts - torch.round(target * counts), min=1).long()  # (R, 1)
    ranked = scores.detach().masked_fill(~response_mask, -torch.inf)
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)  # (R, T) positions by falling score
    rank = torch.argsort(order, dim=-1)  # rank of each position in its row
    hard = ((rank < keep) & response_mask).float()
    ordered = ranked.gather(-1, order)
    kth = ordered.gather(-1, (keep - 1).clamp(max=scores.shape[-1] - 1))
    nxt = ordered.gather(-1, keep.clamp(max=scores.shape[-1] - 1))
    threshold = torch.where(torch.isfinite(nxt) & (keep < counts), (kth + nxt) / 2, kth)  # (R, 1)
    soft = torch.sigmoid(scores - torch.nan_to_num(threshold, neginf=0.0))
    return hard + (soft - soft.detach()) * response_mask


class LearnedMasker(TokenMasker):
    """SparsePO learned masks read from all reference block outputs at the previous position.

    ``independent=False`` (common): one network, ``m_d := m_u`` (same tensor). ``independent=True``: two
    networks with separate parameters and the same input. Sizes are read from the reference at ``bind``.

    With ``target_sparsity`` each mask is ``m = a · g``: the magnitude ``a`` of the mask network as above, times a
    gate ``g`` that keeps the ``(1 − target)`` share of each response's tokens with the highest score of a
    separate gate network (``top_k_gate``). Every response then has exactly the target share of exact zeros at
    every step, in training and at evaluation, with no statistic shared across responses, micro-batches or ranks
    (docs/sparsity.md).
    """

    needs_layers = True

    def __init__(self, independent: bool = False, dropout: float = 0.0, layer_activation: Activation = "relu",
                 mixer_activation: Activation = "relu", init_std: float = 0.02, init: Init = "ones",
                 target_sparsity: float | None = None, target_sparsity_kl: float | None = None) -> None:
        """
        Args:
            independent: two mask networks (reward and KL) instead of one common mask.
            dropout: mask dropout, applied in training when > 0 (the released recipe effectively uses 0, §3.2).
            layer_activation: activation after each per-layer Linear ("relu" or "none").
            mixer_activation: activation after the mixer ("relu" or "none").
            init_std: standard deviation of the normal init of the Linear weights (``init: released``).
            init: ``ones`` (default): every mask starts at exactly 1, so training starts as TDPO1 at the nominal β
                and learns which tokens to drop; ``released``: the released code's N(0, init_std) weights, whose
                masks start near 0 (often entirely 0: a dead start). See ``MaskNetwork``.
            target_sparsity: share of exact zeros in ``[0, 1)`` that a gate sets in every response (of the reward
                mask, and of the KL mask unless ``target_sparsity_kl`` is given); None (default): no gate, the
                released masks. Zeros of the magnitude itself (a ReLU at 0) come on top of the target.
            target_sparsity_kl: the KL mask's own target, with ``independent: true`` only (0 keeps it dense).
        """
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LearnedMasker: dropout must be in [0, 1), got {dropout}.")
        if init not in ("ones", "released"):
            raise ValueError(f"LearnedMasker: init must be 'ones' or 'released', got {init!r}. Fix: "
                             "model.masker.init_args.init: ones (masks start at 1) or released (N(0, init_std)).")
        for name, value in (("target_sparsity", target_sparsity), ("target_sparsity_kl", target_sparsity_kl)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"LearnedMasker: {name} must be in [0, 1) (a share of zeros), got {value}. Fix: "
                                 f"model.masker.init_args.{name}: 0.5 for half of each response's tokens at 0.")
        if target_sparsity_kl is not None and not independent:
            raise ValueError("LearnedMasker: target_sparsity_kl needs independent: true (a common mask has one "
                             "target). Fix: set model.masker.init_args.independent: true, or use target_sparsity.")
        if target_sparsity_kl is not None and target_sparsity is None:
            target_sparsity = 0.0
        self.independent = independent
        self.target_sparsity = target_sparsity
        self.target_sparsity_kl = target_sparsity if target_sparsity_kl is None else target_sparsity_kl
        self._network_args = dict(dropout=dropout, layer_activation=layer_activation,
                                  mixer_activation=mixer_activation, init_std=init_std, init=init)
        self.reward_net: MaskNetwork | None = None
        self.kl_net: MaskNetwork | None = None
        self.reward_gate: nn.Parameter | None = None
        self.kl_gate: nn.Parameter | None = None

    def sparsity_targets(self) -> dict[str, float]:
        """Target share of zeros by mask (``reward``, ``kl``), in %; empty without a target (TensorBoard)."""
        if self.target_sparsity is None:
            return {}
        return {"reward": 100.0 * self.target_sparsity, "kl": 100.0 * self.target_sparsity_kl}

    def bind(self, reference: nn.Module) -> None:
        config = reference.config
        sizes = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                     layer_norm_eps=_layer_norm_eps(config))
        self.reward_net = MaskNetwork(**sizes, **self._network_args)
        self.kl_net = MaskNetwork(**sizes, **self._network_args) if self.independent else None
        if self.target_sparsity is not None:
            # Gate scores s = Σ_l u_l·LN(h_l) on the magnitude network's own normalisation, u ~ N(0, 1/(L·d)) so
            # that s ~ N(0, 1) and differs between tokens from the start (the magnitude of ``init: ones`` is the
            # same on every token), and the LayerNorm gets a gradient at step 0 through the gate.
            shape = (sizes["num_layers"], sizes["hidden_size"])
            std = (shape[0] * shape[1]) ** -0.5
            self.reward_gate = nn.Parameter(torch.randn(shape) * std)
            self.kl_gate = nn.Parameter(torch.randn(shape) * std) if self.independent else None

    def _mask(self, net: MaskNetwork, gate: Tensor | None, target: float, states: Tensor,
              response_mask: Tensor) -> Tensor:
        """``a`` (no gate) or ``a · top_k_gate(s)`` on the response tokens, ``(2B, T-1)`` float32."""
        with torch.autocast(device_type=states.device.type, enabled=False):
            normed = net.normalise(states)  # (n, L, d)
            magnitude = scatter_response(net.read_out(normed), response_mask)
            if gate is None or target == 0.0:
                return magnitude
            scores = scatter_response(torch.einsum("nld,ld->n", normed, gate.float()), response_mask)
        return magnitude * top_k_gate(scores, response_mask, target)

    def forward(self, reference: ReferenceOutputs, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if self.reward_net is None or reference.layers is None:
            raise RuntimeError("LearnedMasker needs bind(reference) and the reference's per-layer hidden states.")
        # Column t of the shifted layout predicts token t+1 from the state at position t: slice [:, :-1].
        states = torch.stack([layer[:, :-1][response_mask] for layer in reference.layers], dim=1)  # (n, L, d)
        reward = self._mask(self.reward_net, self.reward_gate, self.target_sparsity or 0.0, states, response_mask)
        if self.kl_net is None:
            return TokenMasks(reward=reward, kl=reward, common=True, learned=True)
        kl = self._mask(self.kl_net, self.kl_gate, self.target_sparsity_kl or 0.0, states, response_mask)
        return TokenMasks(reward=reward, kl=kl, common=False, learned=True)
