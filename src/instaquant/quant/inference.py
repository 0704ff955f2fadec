"""Quantizer values without autograd, in as few memory passes as the closed forms allow.

In evaluation the straight-through terms of :mod:`.functional` add exactly zero and each
step allocates a new activation-sized tensor. These functions apply the same
floating-point operations in the same order (so values are identical, bit for bit) but
update one buffer in place: the first operation writes a new tensor, or, with
``inplace=True``, overwrites the input itself (routed inference passes a gathered copy
that nothing else reads).

``bits`` and the clip/step may also be per-sample tensors shaped to broadcast over ``x``
(``[B, 1, ...]``, integer bits): routed inference quantizes a batch whose samples chose
different candidates in one pass per operation. Each sample gets exactly the value it
would get alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import levels

Bits = int | Tensor


def _first(x: Tensor, inplace: bool) -> Tensor | None:
    """Where the first operation writes: ``x`` itself, or a new tensor (``None``)."""
    return x if inplace else None


def dorefa_activation(x: Tensor, bits: Bits, signed: bool = False, inplace: bool = False) -> Tensor:
    """The value of :func:`.functional.dorefa_activation`."""
    n = levels(bits)
    if signed:
        y = torch.clamp(x, -1.0, 1.0, out=_first(x, inplace))
        return y.add_(1).div_(2).mul_(n).round_().div_(n).mul_(2).sub_(1)
    y = torch.clamp(x, 0.0, 1.0, out=_first(x, inplace))
    return y.mul_(n).round_().div_(n)


def pact_activation(
    x: Tensor, alpha: Tensor, bits: Bits, signed: bool = False, inplace: bool = False
) -> Tensor:
    """The value of :func:`.functional.pact_activation`."""
    n = levels(bits)
    if signed:
        y = torch.maximum(x, -alpha, out=_first(x, inplace))
        torch.minimum(y, alpha, out=y)
        step = 2 * alpha / n
        return y.add_(alpha).div_(step).round_().mul_(step).sub_(alpha)
    y = torch.relu_(x) if inplace else torch.relu(x)
    torch.minimum(y, alpha, out=y)
    step = alpha / n
    return y.div_(step).round_().mul_(step)


def lsq(v: Tensor, step: Tensor, bits: Bits, signed: bool, inplace: bool = False) -> Tensor:
    """The value of :func:`.functional.lsq`."""
    if signed:  # the bounds of functional.lsq_bounds, for int or tensor bits
        q_n = 2 ** (bits - 1)
        q_p = q_n - 1
    else:
        q_p = levels(bits)
        q_n = q_p * 0  # an int or a tensor, like q_p (clamp_ takes two of a kind)
    y = torch.div(v, step, out=_first(v, inplace))
    return y.clamp_(-q_n, q_p).round_().mul_(step)
