"""Quantizer primitives: pure functions with straight-through estimators.

Every function here computes its forward value with exactly the floating-point
operations of the closed form in its docstring, so tests can compare with
``atol=0, rtol=0``. The straight-through tricks add ``x - x.detach()`` (exactly
zero) rather than subtracting and re-adding the value, which would round.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity gradient."""
    return x.round().detach() + (x - x.detach())


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def levels(bits: int) -> int:
    """Number of steps ``2^bits - 1`` of a ``bits``-bit uniform grid on [0, 1]."""
    return 2**bits - 1


def quantize_unit(v: Tensor, bits: int) -> Tensor:
    """DoReFa's ``q_k(v) = round((2^k - 1) v) / (2^k - 1)`` for ``v`` in [0, 1], STE."""
    n = levels(bits)
    return round_ste(n * v) / n


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights.

    ``bits >= 2``: ``w' = tanh(w) / (2 max|tanh w|) + 1/2``, ``w_q = 2 q_k(w') - 1``.
    ``bits == 1``: ``w_q = sign(w) * mean|w|`` with sign(0) = +1 (two levels), STE.
    """
    if bits == 1:
        scale = w.abs().mean().detach()
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        return (sign.detach() + (w - w.detach())) * scale
    t = torch.tanh(w)
    unit = t / (2 * t.abs().max().detach()) + 0.5
    return 2 * quantize_unit(unit, bits) - 1


def dorefa_activation(x: Tensor, bits: int, signed: bool = False) -> Tensor:
    """DoReFa activations: ``q_k(clamp(x, 0, 1))``; signed: ``2 q_k((clamp(x, -1, 1) + 1) / 2) - 1``."""
    if signed:
        return 2 * quantize_unit((x.clamp(-1.0, 1.0) + 1) / 2, bits) - 1
    return quantize_unit(x.clamp(0.0, 1.0), bits)


def pact_activation(x: Tensor, alpha: Tensor, bits: int, signed: bool = False) -> Tensor:
    """PACT: ``y = clamp(x, 0, α)``, step ``Δ = α / (2^k - 1)``, ``y_q = round(y / Δ) Δ``.

    Signed: ``y = clamp(x, -α, α)``, ``Δ = 2α / (2^k - 1)``,
    ``y_q = round((y + α) / Δ) Δ - α``. The step is treated as a constant in the
    backward pass, so ``∂y_q/∂α = 1`` where ``x ≥ α`` (``-1`` where ``x ≤ -α``),
    else 0, as in the PACT paper.
    """
    n = levels(bits)
    if signed:
        y = torch.minimum(torch.maximum(x, -alpha), alpha)
        step = (2 * alpha / n).detach()
        a = alpha.detach()
        return round_ste((y + a) / step) * step - a
    y = torch.minimum(x.relu(), alpha)
    step = (alpha / n).detach()
    return round_ste(y / step) * step


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's integer range ``(Q_N, Q_P)``: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``."""
    if signed:
        if bits < 2:
            raise ValueError(f"signed LSQ needs bits >= 2, got {bits} (allowed: 2..8)")
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq(v: Tensor, step: Tensor, bits: int, signed: bool, features: int | None = None) -> Tensor:
    """LSQ: ``v_q = round(clamp(v / s, -Q_N, Q_P)) s`` with ``s``'s gradient scaled by ``1/sqrt(N Q_P)``.

    ``N`` is ``features`` when given (the LSQ paper's N_F for activations: the features of one
    sample, so the step's gradient does not change with the batch size), else ``v.numel()``
    (the weights).
    """
    q_n, q_p = lsq_bounds(bits, signed)
    g = 1.0 / ((features or v.numel()) * q_p) ** 0.5
    s = grad_scale(step, g)
    return round_ste((v / s).clamp(-q_n, q_p)) * s


def lsq_init_step(v: Tensor, bits: int, signed: bool) -> Tensor:
    """LSQ's initial step ``2 mean|v| / sqrt(Q_P)`` (floored so that an all-zero tensor stays finite)."""
    _, q_p = lsq_bounds(bits, signed)
    return (2 * v.detach().abs().mean() / q_p**0.5).clamp_min(1e-8)
