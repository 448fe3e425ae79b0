"""Learned token masks (method.md §3, the released ``SimpleMaskAllLayers``), common or independent."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker, scatter_response
from sparsepo_lightning.types import TokenMasks

Activation = Literal["relu", "none"]


def _activation(name: Activation) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Identity()


class MaskNetwork(nn.Module):
    """All-layer mask head: shared LayerNorm → per-layer Linear(d→1)+act (+dropout) → bias-free mixer + act.

    ``g_l = LN(h_l)``; ``z_l = drop(act(w_l·g_l + b_l))``; ``m = drop(act(Σ_l v_l z_l))`` (method.md §3.2).
    Output is ≥ 0 with ReLU and unbounded above (parity with the released code). Parameters:
    ``L·(d+1) + L + 2d``. Init: weights N(0, ``init_std``), biases 0, LayerNorm (1, 0).
    """

    def __init__(self, num_layers: int, hidden_size: int, layer_norm_eps: float = 1e-5, dropout: float = 0.0,
                 layer_activation: Activation = "relu", mixer_activation: Activation = "relu",
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))  # w_l, one row per layer
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))  # b_l
        self.mixer_weight = nn.Parameter(torch.empty(num_layers))  # v_l, no bias
        self.layer_act = _activation(layer_activation)
        self.mixer_act = _activation(mixer_activation)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.layer_weight, std=init_std)
        nn.init.normal_(self.mixer_weight, std=init_std)

    def forward(self, states: Tensor) -> Tensor:
        """Mask values for ``n`` tokens from their reference states ``(n, L, d)`` → ``(n,)``, float32."""
        # Masks stay fp32 under AMP, and whatever dtype a wrapper stores the parameters in (FSDP1 mixed precision
        # casts every parameter of a unit to bf16 for the forward; LayerNorm would refuse fp32 input then).
        with torch.autocast(device_type=states.device.type, enabled=False):
            norm = self.norm
            normed = F.layer_norm(states.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                                  norm.eps)  # (n, L, d)
            per_layer = torch.einsum("nld,ld->nl", normed, self.layer_weight.float()) + self.layer_bias.float()
            per_layer = self.dropout(self.layer_act(per_layer))  # (n, L)
            return self.dropout(self.mixer_act(per_layer @ self.mixer_weight.float()))  # (n,)


def _layer_norm_eps(config: object) -> float:
    for name in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps"):
        value = getattr(config, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


class LearnedMasker(TokenMasker):
    """SparsePO learned masks read from all reference block outputs at the previous position.

    ``independent=False`` (common): one network, ``m_d := m_u`` (same tensor). ``independent=True``: two
    networks with separate parameters and the same input. Sizes are read from the reference at ``bind``.
    """

    needs_layers = True

    def __init__(self, independent: bool = False, dropout: float = 0.0, layer_activation: Activation = "relu",
                 mixer_activation: Activation = "relu", init_std: float = 0.02) -> None:
        """
        Args:
            independent: two mask networks (reward and KL) instead of one common mask.
            dropout: mask dropout, applied in training when > 0 (the released recipe effectively uses 0, §3.2).
            layer_activation: activation after each per-layer Linear ("relu" or "none").
            mixer_activation: activation after the mixer ("relu" or "none").
            init_std: standard deviation of the normal init of the Linear weights.
        """
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LearnedMasker: dropout must be in [0, 1), got {dropout}.")
        self.independent = independent
        self._network_args = dict(dropout=dropout, layer_activation=layer_activation,
                                  mixer_activation=mixer_activation, init_std=init_std)
        self.reward_net: MaskNetwork | None = None
        self.kl_net: MaskNetwork | None = None

    def bind(self, reference: nn.Module) -> None:
        config = reference.config
        sizes = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                     layer_norm_eps=_layer_norm_eps(config))
        self.reward_net = MaskNetwork(**sizes, **self._network_args)
        self.kl_net = MaskNetwork(**sizes, **self._network_args) if self.independent else None

    def forward(self, reference: ReferenceOutputs, response_mask: Tensor) -> TokenMasks:
        if self.reward_net is None or reference.layers is None:
            raise RuntimeError("LearnedMasker needs bind(reference) and the reference's per-layer hidden states.")
        # Column t of the shifted layout predicts token t+1 from the state at position t: slice [:, :-1].
        states = torch.stack([layer[:, :-1][response_mask] for layer in reference.layers], dim=1)  # (n, L, d)
        reward = scatter_response(self.reward_net(states), response_mask)
        if self.kl_net is None:
            return TokenMasks(reward=reward, kl=reward, common=True, learned=True)
        kl = scatter_response(self.kl_net(states), response_mask)
        return TokenMasks(reward=reward, kl=kl, common=False, learned=True)
