"""Exact-gradient training path for dynamic layers: K forward branches, one backward per sample.

The reference mixture ``y = Σ_k m_k · op(Q^a_k(x), Q^w_k(W))`` with a hard one-hot ``m``
(straight-through Gumbel-Softmax) has the gradients

- ``∂L/∂m[b, k] = <∂L/∂y[b], y_k[b]>`` for every k: the controller needs the forward
  output of every branch;
- ``∂L/∂y_k[b] = m[b, k] · ∂L/∂y[b]``, exactly zero unless k is sample b's choice: the
  backward of branch k only has to run on the samples that chose k.

:func:`mixture_forward` computes the K branch outputs on the whole batch (the same
values as the reference, so the output is bit-identical), keeps them for the controller's
gradient, and in backward runs one convolution backward per candidate on that candidate's
samples only: about ``K`` forward + 2 backward convolutions instead of ``K + 2K``.

Quantizer gradients (PACT α, LSQ step, DoReFa through tanh) flow through the quantizers' own
autograd. Each candidate's quantized weight is computed once per call. Activation
quantizers that act element by element with parameter gradients summed over elements
(PACT, DoReFa) are differentiated on each candidate's rows only (their full-batch values are
computed without autograd); any other quantizer (LSQ, LQ-Nets, or a quantizer this module
does not know) is applied with autograd to the whole batch exactly as the reference does, so
its gradient is the reference's by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.methods import DoReFaActivation, PACTActivation
from .routing import plan_keys

# Quantizers q for which q(x[rows], k) == q(x, k)[rows] in value and whose parameter gradient is
# a plain sum over elements, so differentiating each candidate's rows alone is exact.
ROW_SEPARABLE = (PACTActivation, DoReFaActivation)


@dataclass(frozen=True)
class _Plan:
    """Which sample chose which candidate: ``index`` ``[B]`` and the rows of each candidate."""

    index: Tensor
    rows: tuple[Tensor, ...]
    counts: tuple[int, ...]
    batch: int


def plan_from_selection(sel: Tensor) -> _Plan | None:
    """The per-candidate row split of a one-hot ``[B, K]`` selection; None if it is not one-hot.

    A hard Gumbel-Softmax sample is ``one_hot - soft.detach() + soft``: exactly zero off the
    choice, and ``1 ± ulp`` on it, so the test is "one non-zero per row".
    """
    B, K = sel.shape
    chosen = sel != 0
    if B == 0 or not bool((chosen.sum(1) == 1).all()):
        return None
    index = chosen.to(torch.int8).argmax(1)
    split = plan_keys(index, K)
    return _Plan(index, tuple(split.order.split(split.counts)), tuple(split.counts), B)


# --------------------------------------------------------------------------- ops


class _Conv:
    """``conv2d`` with fixed hyper-parameters, and its backward on a subset of samples."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.stride = list(conv.stride)
        self.padding = list(conv.padding) if conv.padding_mode == "zeros" else [0, 0]
        self.dilation = list(conv.dilation)
        self.groups = conv.groups

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self, g: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            [need_x, need_w, False],
        )
        return gx, gw

    @staticmethod
    def bias_grad(g: Tensor) -> Tensor:
        return g.sum(dim=(0, 2, 3))


class _Linear:
    """``linear`` and its backward (inputs ``[B, ..., in]``)."""

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias)

    def backward(
        self, g: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        gx = g.matmul(w) if need_x else None
        gw = g.flatten(0, -2).t().mm(x.flatten(0, -2)) if need_w else None
        return gx, gw

    @staticmethod
    def bias_grad(g: Tensor) -> Tensor:
        return g.flatten(0, -2).sum(0)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------- autograd


class _RowSplit(torch.autograd.Function):
    """``x`` split into the given row sets; backward writes each part's gradient in place.

    The row sets partition the batch, so one ``empty`` and K ``index_copy_`` replace K
    zero-filled scatters and their sum (what chained ``index_select`` would cost).
    """

    @staticmethod
    def forward(ctx, x: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.rows = rows
        ctx.shape = x.shape
        return tuple(x.index_select(0, r) for r in rows)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out = grads[0].new_empty(ctx.shape)
        for r, g in zip(ctx.rows, grads, strict=True):
            out.index_copy_(0, r, g)
        return (out, *([None] * len(ctx.rows)))


class _SelectedBranches(torch.autograd.Function):
    """``out[b] = m[b, k_b] · op(x_{k_b}, w_{k_b}, bias)[b]`` with the mixture's exact gradient.

    Tensor arguments after ``m`` and ``bias``: K weights, then the full-batch inputs (K, or one
    shared by every branch), then K row-inputs (candidate k's rows, or None). Gradients go to
    the row-input of a candidate where given, else to its full-batch input.
    """

    @staticmethod
    def forward(ctx, op, plan: _Plan, m: Tensor, bias: Tensor | None, *tensors):  # type: ignore[override]
        K = len(plan.counts)
        ws, rest = tensors[:K], tensors[K:]
        vals, rows = rest[: len(rest) - K], rest[len(rest) - K :]
        ys = [op.forward(vals[k if len(vals) > 1 else 0], ws[k], bias) for k in range(K)]
        m_sel = m.gather(1, plan.index[:, None]).squeeze(1)
        if plan.batch in plan.counts:
            y = ys[plan.counts.index(plan.batch)]
            out = y * _bcast(m_sel, y)
        else:
            out = ys[0].new_empty(ys[0].shape)
            for k, idx in enumerate(plan.rows):
                out.index_copy_(0, idx, ys[k].index_select(0, idx))
            out.mul_(_bcast(m_sel, out))
        ctx.op, ctx.plan, ctx.num_vals = op, plan, len(vals)
        ctx.has_bias = bias is not None
        # Keep only what backward reads: a full-batch input where no row-input replaces it, and
        # the branch outputs only when the selection wants a gradient.
        if len(vals) > 1:
            keep = [r is None and n > 0 for r, n in zip(rows, plan.counts, strict=True)]
            vals = [v if k else None for v, k in zip(vals, keep, strict=True)]
        if not ctx.needs_input_grad[2]:
            ys = [None] * K
        ctx.save_for_backward(m_sel, *ws, *vals, *rows, *ys)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        op, plan, nv = ctx.op, ctx.plan, ctx.num_vals
        K, B = len(plan.counts), plan.batch
        saved = ctx.saved_tensors
        m_sel, ws = saved[0], saved[1 : 1 + K]
        vals, rows, ys = saved[1 + K : 1 + K + nv], saved[1 + K + nv : 1 + 2 * K + nv], saved[-K:]
        need = ctx.needs_input_grad  # (op, plan, m, bias, *ws, *vals, *rows)
        need_w, need_v, need_r = need[4 : 4 + K], need[4 + K : 4 + K + nv], need[4 + K + nv :]

        grad_m = None
        if need[2]:
            g2 = g.reshape(B, -1)
            grad_m = torch.stack([torch.linalg.vecdot(y.reshape(B, -1), g2) for y in ys], 1)
        gm = g * _bcast(m_sel, g)  # ∂L/∂y_k on the rows that chose k (zero elsewhere)
        grad_bias = op.bias_grad(gm) if ctx.has_bias and need[3] else None

        grad_w: list[Tensor | None] = [None] * K
        grad_v: list[Tensor | None] = [None] * nv
        grad_r: list[Tensor | None] = [None] * K
        for k, n in enumerate(plan.counts):
            if n == 0:
                continue
            full = n == B
            v = k if nv > 1 else 0
            to_rows = rows[k] is not None
            want_x = need_r[k] if to_rows else need_v[v]
            if not (want_x or need_w[k]):
                continue
            idx = plan.rows[k]
            g_k = gm if full else gm.index_select(0, idx)
            x_k = rows[k] if to_rows else (vals[v] if full else vals[v].index_select(0, idx))
            gx, grad_w[k] = op.backward(g_k, x_k, ws[k], want_x, need_w[k])
            if gx is None:
                continue
            if to_rows:
                grad_r[k] = gx
            elif full:
                grad_v[v] = gx
            elif nv > 1:
                grad_v[v] = gx.new_zeros(vals[v].shape).index_copy_(0, idx, gx)
            else:
                # Shared input: the candidates' rows partition the batch.
                if grad_v[0] is None:
                    grad_v[0] = gx.new_empty(vals[0].shape)
                grad_v[0].index_copy_(0, idx, gx)
        return (None, None, grad_m, grad_bias, *grad_w, *grad_v, *grad_r)


# --------------------------------------------------------------------------- entry point


def _op_for(layer: nn.Module) -> _Conv | _Linear:
    if isinstance(layer, nn.Conv2d):
        return _Conv(layer)
    return _Linear()


def supports(layer: nn.Module) -> bool:
    """Whether :func:`mixture_forward` handles ``layer`` (else it uses the reference mixture)."""
    if isinstance(layer, nn.Conv2d):
        # String padding ("same") may be asymmetric; the reference handles it.
        return not isinstance(layer.padding, str)
    return isinstance(layer, nn.Linear)


def _pad(layer: nn.Module, x: Tensor) -> Tensor:
    """Non-zero padding modes are applied before the op, as ``Conv2d._conv_forward`` does."""
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return x


def mixture_forward(
    layer: nn.Module, x: Tensor, sel_w: Tensor, sel_a: Tensor, joint: bool
) -> Tensor:
    """The reference mixture's value and gradients at about ``K`` forward + 2 backward ops.

    ``layer`` is a dynamic layer (``aq``, ``wq``, ``weight``, ``bias``, ``bits``,
    ``reference_forward``). Selections that are not one-hot, and layers
    :func:`supports` rejects, go to ``layer.reference_forward``.
    """
    plan_w = plan_from_selection(sel_w) if supports(layer) else None
    if plan_w is None:
        return layer.reference_forward(x, sel_w, sel_a, joint)
    K = len(layer.bits)
    ws = layer.candidate_weights()
    if joint:
        vals, rows = _joint_inputs(layer, x, plan_w)
    else:
        # Separate choice: the activation mixture is elementwise and cheap next to the op, so it
        # keeps the reference formula; the K weight branches then share one input.
        x_mix = sum(_bcast(sel_a[:, j], x) * layer.aq(x, j) for j in range(K))
        vals, rows = [_pad(layer, x_mix)], [None] * K
    return _SelectedBranches.apply(_op_for(layer), plan_w, sel_w, layer.bias, *ws, *vals, *rows)


def _joint_inputs(layer: nn.Module, x: Tensor, plan: _Plan) -> tuple[list, list]:
    """Full-batch quantized inputs per candidate (for the forward) and the differentiable ones."""
    K, B = len(plan.counts), plan.batch
    if type(layer.aq) not in ROW_SEPARABLE:
        return [_pad(layer, layer.aq(x, k)) for k in range(K)], [None] * K
    vals: list[Tensor] = []
    rows: list[Tensor | None] = [None] * K
    for k in range(K):
        if plan.counts[k] == B:
            rows[k] = _pad(layer, layer.aq(x, k))
            vals.append(rows[k].detach())
        else:
            # The first call sees the whole batch, so lazy data-dependent init matches the reference.
            with torch.no_grad():
                vals.append(_pad(layer, layer.aq.infer(x, k)))
    partial = [k for k in range(K) if 0 < plan.counts[k] < B]
    if partial:
        parts = _RowSplit.apply(x, *(plan.rows[k] for k in partial))
        for k, part in zip(partial, parts, strict=True):
            rows[k] = _pad(layer, layer.aq(part, k))
    return vals, rows
