"""Graph-static execution: each sample's candidate selected by indexing, not by routing.

Routed inference (:mod:`.routing`) splits the batch by candidate with data-dependent Python
(group sizes read on the host), which ``torch.export``, ONNX and ``torch.compile`` cannot
follow. Here every dynamic layer runs the same operators whatever the controller chose:

- the activation quantizer takes each row's clip or step and bit-width by indexing its
  per-candidate parameters with the row's candidate (one element-wise pass);
- the K candidates' quantized weights, stacked ``[K, ...]`` once, are indexed per sample:
  at batch 1 that is one convolution on the chosen weight, no extra compute; at batch B the
  per-sample weights go through one grouped convolution (B groups), which costs as many
  MACs as the static layer but runs as B small convolutions.
- an exported batch-1 graph (:func:`select_branch`) instead holds one branch per candidate
  with its weight a constant, chosen by a conditional (ONNX ``If``): runtimes prepare
  constant weights once, and the layer runs exactly as the static layer of that candidate.

Values equal routed inference's (same quantizers, same weights), to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import inference as I_q
from ..quant.methods import (
    DoReFaActivation,
    LSQQuantizer,
    PACTActivation,
    Quantizer,
)


class UnsupportedForGraphError(ValueError):
    """A quantizer or layer the graph-static form has no indexed version of."""


def indexed_activation(aq: Quantizer, x: Tensor, index: Tensor) -> Tensor:
    """Row ``b`` of ``x`` quantized with candidate ``index[b]``, without data-dependent Python."""
    bits = aq.row_bits(index, x)
    if isinstance(aq, PACTActivation):
        aq.maybe_init(aq.alpha, x)  # as routed inference does (a no-op once set or frozen)
        return I_q.pact_activation(x, aq.per_row(aq.alpha, index, x), bits, aq.signed)
    if isinstance(aq, LSQQuantizer):
        aq.maybe_init(aq.step, x)
        return I_q.lsq(x, aq.per_row(aq.step, index, x), bits, aq.signed)
    if isinstance(aq, DoReFaActivation):
        return I_q.dorefa_activation(x, bits, aq.signed)
    raise UnsupportedForGraphError(
        f"activation quantizer {type(aq).__name__} has no graph-static form; "
        "supported: dorefa, pact, lsq"
    )


def per_sample_conv(conv: nn.Conv2d, x: Tensor, weights: Tensor) -> Tensor:
    """``conv`` applied to sample ``b`` with weight ``weights[b]`` (``[B, O, I/g, kh, kw]``)."""
    B = x.shape[0]
    if B == 1:
        return conv._conv_forward(x, weights[0], conv.bias)
    if conv.padding_mode != "zeros":
        raise UnsupportedForGraphError(
            f"padding_mode {conv.padding_mode!r} has no graph-static batched form; "
            "supported: zeros (or batch 1)"
        )
    _, out_channels, *rest = weights.shape
    y = F.conv2d(
        x.reshape(1, B * x.shape[1], *x.shape[2:]),
        weights.reshape(B * out_channels, *rest),
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        B * conv.groups,
    )
    y = y.reshape(B, out_channels, *y.shape[2:])
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, -1, 1, 1)
    return y


def per_sample_linear(linear: nn.Linear, x: Tensor, weights: Tensor) -> Tensor:
    """``linear`` applied to sample ``b`` with weight ``weights[b]`` (``[B, O, I]``)."""
    if x.shape[0] == 1:
        return F.linear(x, weights[0], linear.bias)
    y = torch.einsum("b...i,boi->b...o", x, weights)
    return y if linear.bias is None else y + linear.bias


def select_branch(
    index: Tensor, count: int, branch: Callable[[int, Tensor], Tensor], x: Tensor
) -> Tensor:
    """``branch(index, x)`` for a 0-d ``index`` in ``0..count-1``, through nested
    ``torch.cond``: the graph holds every branch and picks one at run time."""

    def from_candidate(j: int) -> Callable[[Tensor], Tensor]:
        if j == count - 1:
            return lambda t: branch(j, t)
        return lambda t: torch.cond(index == j, lambda u: branch(j, u), from_candidate(j + 1), (t,))

    return from_candidate(0)(x)
