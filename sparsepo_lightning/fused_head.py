"""The linear LM head inside the fused chunked passes (``logprobs.FusedTokenStats``,
``distributions.FusedDistributionStats``): the logits of one chunk, and the head's gradients accumulated chunk by
chunk in backward, so no ``(tokens, V)`` tensor is ever held whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(c, d) → (c, V)`` float32 logits: the matmul in the weights' dtype (as the model does), upcast per chunk."""
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


class HeadGradients:
    """Gradients of a linear head's input, weight and bias, accumulated chunk by chunk in a fused backward (weight
    and bias in float32, cast to their dtypes by :meth:`result`); each is None where autograd needs none."""

    def __init__(self, needs_input_grad: tuple[bool, ...], hidden: Tensor, weight: Tensor) -> None:
        need_h, need_w, need_b = needs_input_grad[:3]
        self.hidden = torch.zeros_like(hidden) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, chunk: slice, grad_z: Tensor, hidden: Tensor, weight: Tensor) -> None:
        """Add one chunk: ``grad_z`` is the gradient of its logits, ``(c, V)`` in the weights' dtype; the head's
        input is taken in the weights' dtype, as :func:`head_logits` takes it."""
        if self.hidden is not None:
            self.hidden[chunk] = (grad_z @ weight).to(self.hidden.dtype)
        if self.weight is not None:
            self.weight.addmm_(grad_z.t().float(), hidden[chunk].to(weight.dtype).float())  # no-op casts in float32
        if self.bias is not None:
            self.bias += grad_z.float().sum(0)

    def result(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_hidden, grad_weight, grad_bias)`` in the dtypes of the tensors they belong to."""
        grad_w = None if self.weight is None else self.weight.to(weight.dtype)
        grad_b = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, grad_w, grad_b
