"""LQ-Nets (Zhang et al., ECCV 2018): learned non-uniform quantization with a basis per bit-width.

A ``k``-bit quantizer holds a basis ``v ∈ R^k``; its ``2^k`` levels are ``v·e`` for the
codes ``e ∈ {-1, 1}^k`` (weights, signed activations) or ``e ∈ {0, 1}^k`` (unsigned
activations). A value is quantized to its nearest level, with a straight-through gradient.

The basis is not trained by SGD. Quantization error minimisation (QEM) alternates two
steps on the current tensor: assign every value to its nearest level (codes ``B``),
then solve the least-squares problem ``min_v ||x - B v||²``. During training one QEM
step per forward moves the basis by a moving average, like BatchNorm's running stats.

Tensors are grouped as ``[G, M]``: ``G`` bases (one per output channel, or ``G = 1``),
each quantizing its ``M`` values. Bases are ``[G, k]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .methods import InitFlags, Quantizer

#: Moving-average factor of the basis (LQ-Nets: 0.9): ``v ← m·v + (1 - m)·v_QEM``.
MOMENTUM = 0.9
#: Ridge weight of the least-squares solve, relative to the mean diagonal of ``BᵀB``.
RIDGE = 1e-6
#: A new basis is kept only if it lowers the error by this fraction of the signal energy.
TOL = 1e-9
#: QEM iterations run on the first tensor a quantizer sees.
INIT_STEPS = 3
#: Top levels (in multiples of the data's RMS) tried for the initial uniform grid.
INIT_RANGE = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Values per group used for the initialisation (a strided subset of larger tensors).
INIT_SAMPLES = 1 << 14
#: Below this many values (torch's parallel grain size) a CPU tensor is searched in-thread.
SMALL = 1 << 15


def codes(
    bits: int,
    signed: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``[2^bits, bits]`` code matrix: row ``l`` holds bit ``i`` of ``l`` (as ±1 if signed)."""
    idx = torch.arange(2**bits, device=device)
    bit = (idx[:, None] >> torch.arange(bits, device=device)) & 1
    e = bit.to(dtype)
    return 2 * e - 1 if signed else e


def lq_levels(basis: Tensor, signed: bool) -> Tensor:
    """Levels ``[..., 2^k]`` of bases ``[..., k]``: ``Σ_i e_i v_i`` summed in order ``i = 0..k-1``.

    An explicit ordered sum (not a matmul) so that the levels do not depend on memory
    layout or on the BLAS kernel: equal bases give bit-identical levels.
    """
    return _levels(basis, codes(basis.shape[-1], signed, basis.dtype, basis.device))


def _levels(basis: Tensor, e: Tensor) -> Tensor:
    out = e[:, 0] * basis[..., 0:1]
    for i in range(1, e.shape[1]):
        out = out + e[:, i] * basis[..., i : i + 1]
    return out


def _work_dtype(x: Tensor) -> torch.dtype:
    # searchsorted and the statistics want at least float32; half inputs are upcast.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def nearest_level(x: Tensor, basis: Tensor, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Each value of ``x`` ``[G, M]`` at its nearest level of ``basis`` ``[G, k]``.

    Returns ``(q, code, sorted_levels)``: ``q`` ``[G, M]`` in ``x``'s working dtype, ``code``
    ``[G, M]`` the index ``l`` of the chosen code row, and the sorted levels ``[G, 2^k]``.
    A value exactly halfway between two levels goes to the lower one.
    """
    dtype = _work_dtype(x)
    lv = lq_levels(basis.detach(), signed).to(dtype)
    sorted_lv, order = lv.sort(dim=-1, stable=True)
    bounds = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) / 2
    pos = _count_below(bounds.contiguous(), x.detach().to(dtype).contiguous(), basis.shape[-1])
    return sorted_lv.gather(1, pos), order.gather(1, pos), sorted_lv


def _count_below(bounds: Tensor, x: Tensor, k: int) -> Tensor:
    """How many of the ``2^k - 1`` sorted ``bounds`` (per row) lie strictly below each ``x``."""
    if x.device.type != "cpu" or x.numel() >= SMALL:
        return torch.searchsorted(bounds, x)
    # Small CPU tensors (per-channel weights): a binary search over the k bits of the
    # position, k elementwise steps that stay on the calling thread, where searchsorted always
    # goes through the intra-op thread pool (milliseconds per call when the cores are busy).
    pos = torch.zeros_like(x, dtype=torch.long)
    for step in reversed(range(k)):
        cand = pos + (1 << step)
        pos = torch.where(bounds.gather(1, cand - 1) < x, cand, pos)
    return pos


def lq_quantize(x: Tensor, basis: Tensor, signed: bool, clip_grad: bool = False) -> Tensor:
    """``x`` ``[G, M]`` at its nearest level, straight-through gradient (no gradient to ``basis``).

    ``clip_grad``: the gradient is zero outside ``[lowest level, highest level]``, where the
    output no longer follows the input (used for activations). Otherwise it is the identity.
    """
    q, _, sorted_lv = nearest_level(x, basis, signed)
    return _ste(x, q, sorted_lv, clip_grad)


def _ste(x: Tensor, q: Tensor, sorted_lv: Tensor, clip_grad: bool) -> Tensor:
    # ``x - x.detach()`` is exactly zero: the forward value is exactly the level.
    delta = x - x.detach()
    if clip_grad:
        lo, hi = sorted_lv[:, :1].to(x.dtype), sorted_lv[:, -1:].to(x.dtype)
        delta = delta * ((x >= lo) & (x <= hi)).to(x.dtype)
    return q.to(x.dtype) + delta


def level_stats(x: Tensor, code: Tensor, num_levels: int) -> tuple[Tensor, Tensor]:
    """Per group and code: count and sum of the values assigned to it (float64, ``[G, L]``)."""
    G = x.shape[0]
    offset = torch.arange(G, device=x.device)[:, None] * num_levels
    flat = (code + offset).flatten()
    counts = torch.bincount(flat, minlength=G * num_levels).view(G, num_levels)
    sums = torch.bincount(
        flat, weights=x.detach().to(torch.float64).flatten(), minlength=G * num_levels
    )
    return counts.to(torch.float64), sums.view(G, num_levels)


def _assigned_error(counts: Tensor, means: Tensor, levels: Tensor) -> Tensor:
    """``Σ_l n_l (μ_l - q_l)²`` per group: the error for a fixed assignment, less a constant.

    With ``n_l`` values of mean ``μ_l`` on code ``l``, ``Σ_{x→l} (x - q)² =
    Σ_{x→l} (x - μ_l)² + n_l (μ_l - q)²`` and the first term does not depend on the basis;
    this form has no cancellation.
    """
    return (counts * (means - levels) ** 2).sum(-1)


def solve_basis(
    counts: Tensor,
    sums: Tensor,
    basis: Tensor,
    signed: bool,
    momentum: float = 0.0,
    ridge: float = RIDGE,
    tol: float = TOL,
) -> Tensor:
    """QEM's second step for a fixed assignment given by its statistics (see :func:`level_stats`).

    Solves ``(BᵀB + λI) v = Bᵀx + λ v_old`` per group (``BᵀB = Eᵀ diag(n) E``,
    ``Bᵀx = Eᵀ s``), a least-squares fit pulled towards the old basis with a small ridge
    ``λ = ridge · mean diag(BᵀB)``: where the system is singular (codes never used) the old
    basis is kept in those directions, elsewhere the solution is the least-squares one.
    The result is ``momentum · v_old + (1 - momentum) · v_solved``. Both steps never raise the
    error for the fixed assignment (the ridge solution beats ``v_old`` on the fit term,
    and the error is convex in ``v``); as a guard against rounding, a group keeps its old basis
    unless the new one lowers that error by ``tol`` times the signal energy.
    """
    k = basis.shape[-1]
    e = codes(k, signed, torch.float64, counts.device)
    old = basis.detach().to(torch.float64)
    gram = (counts[:, :, None] * e).mT @ e
    rhs = sums @ e
    diag_mean = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / k
    lam = (ridge * diag_mean.clamp_min(1.0))[:, None]
    eye = torch.eye(k, dtype=torch.float64, device=counts.device)
    # solve_ex: a singular system (ridge=0) gives non-finite values, caught below, not an error.
    solved = torch.linalg.solve_ex(gram + lam[:, :, None] * eye, rhs + lam * old)[0]
    new = momentum * old + (1 - momentum) * solved
    means = sums / counts.clamp_min(1.0)
    err_old, err_new = _assigned_error(counts, means, _levels(torch.stack([old, new]), e))
    energy = (counts * means**2).sum(-1) + err_old
    better = torch.isfinite(new).all(-1) & (err_new < err_old - tol * energy)
    return torch.where(better[:, None], new, old).to(basis.dtype)


def qem_step(
    x: Tensor,
    basis: Tensor,
    signed: bool,
    momentum: float = 0.0,
    ridge: float = RIDGE,
    tol: float = TOL,
) -> Tensor:
    """One QEM step on ``x`` ``[G, M]``: assign to the nearest levels, then :func:`solve_basis`."""
    _, code, _ = nearest_level(x, basis, signed)
    counts, sums = level_stats(x, code, 2 ** basis.shape[-1])
    return solve_basis(counts, sums, basis, signed, momentum, ridge, tol)


def quantization_error(x: Tensor, basis: Tensor, signed: bool) -> Tensor:
    """``Σ (x - Q(x))²`` per group ``[G]``, in float64."""
    q, _, _ = nearest_level(x, basis, signed)
    return ((x.detach().to(torch.float64) - q.to(torch.float64)) ** 2).sum(-1)


def init_basis(x: Tensor, bits: int, signed: bool, steps: int = INIT_STEPS) -> Tensor:
    """A starting basis ``[G, bits]`` for ``x`` ``[G, M]`` (float64).

    As LQ-Nets, powers of two ``v_i = c·2^i`` (a uniform grid). The top level is the best of a
    few multiples of the data's RMS (floored so that all-zero data stays finite), then
    ``steps`` full QEM steps on ``x`` refine the basis (QEM alone converges slowly from a
    grid that is far too narrow or too wide). Large tensors are subsampled with a stride.
    """
    stride = max(1, x.shape[1] // INIT_SAMPLES)
    x = x.detach()[:, ::stride].to(torch.float64)
    rms = x.square().mean(-1).sqrt().clamp_min(1e-8)
    powers = 2.0 ** torch.arange(bits, dtype=torch.float64, device=x.device)
    # All candidate ranges in one pass: row ``r * G + g`` is range ``r`` for group ``g``.
    G, R = x.shape[0], len(INIT_RANGE)
    mult = torch.tensor(INIT_RANGE, dtype=torch.float64, device=x.device).repeat_interleave(G)
    grids = (mult * rms.repeat(R) / (2**bits - 1))[:, None] * powers
    err = quantization_error(x.repeat(R, 1), grids, signed).view(R, G)
    best = grids.view(R, G, bits)[err.argmin(0), torch.arange(G, device=x.device)]
    for _ in range(steps):
        best = qem_step(x, best, signed)
    return best


class LQNetsQuantizer(InitFlags, Quantizer):
    """LQ-Nets quantizer over candidate bit-widths: one basis per candidate (buffer ``basis``).

    ``basis`` is ``[num_slots, G, max(bits)]``; slot ``s`` of a ``b``-bit candidate uses
    ``basis[s, :, :b]`` (the rest is unused padding). ``G`` is the number of output channels
    with ``per_channel=True``, else 1; it is fixed when the first tensor is seen, and a state
    dict resizes it on load. Every slot is initialised from the first tensor that is not all
    zero (:func:`init_basis`). In training mode each call runs one QEM step on the tensor it
    quantized (the whole batch, whichever samples chose the candidate) and moves that
    candidate's basis by the moving average ``momentum``; in evaluation mode the basis is fixed.
    Bases of different bit-widths cannot be shared, so ``share=True`` needs a single bit-width.
    """

    def __init__(
        self,
        bits: tuple[int, ...],
        signed: bool,
        share: bool = False,
        per_channel: bool = False,
        momentum: float = MOMENTUM,
        init_steps: int = INIT_STEPS,
        clip_grad: bool = True,
    ) -> None:
        super().__init__(bits, share)
        if share and len(set(self.bits)) > 1:
            raise ValueError(
                f"LQ-Nets keeps one basis per bit-width; share=True needs a single bit-width, "
                f"got bits={self.bits}"
            )
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.signed = signed
        self.per_channel = per_channel
        self.momentum = float(momentum)
        self.init_steps = int(init_steps)
        self.clip_grad = clip_grad
        self.register_buffer("basis", torch.zeros(self.num_slots, 1, max(self.bits)))
        self.register_buffer("initialized", torch.zeros(self.num_slots, dtype=torch.bool))

    def grouped(self, v: Tensor) -> Tensor:
        """``v`` as ``[G, M]``: one row per output channel, or a single row."""
        return v.reshape(v.shape[0], -1) if self.per_channel else v.reshape(1, -1)

    def maybe_init(self, x: Tensor) -> None:
        """Initialise every slot at once from the first grouped tensor ``x`` ``[G, M]``."""
        if self.all_initialized():
            return
        # Outside inference mode even when called in it: a basis created there would be an
        # inference tensor, which later training updates and version checks cannot use.
        with torch.no_grad(), torch.inference_mode(False):
            basis = self.basis
            if basis.shape[1] != x.shape[0]:
                basis = basis.new_zeros(self.num_slots, x.shape[0], basis.shape[2])
            for s in range(self.num_slots):
                if not bool(self.initialized[s]):
                    b = self.bits[s]
                    basis[s, :, :b] = init_basis(x, b, self.signed, self.init_steps)
            self.basis = basis
            # An all-zero first tensor (a dead layer, a blank batch) says nothing about the
            # scale: keep the finite floor basis and initialise again from the next tensor.
            self.set_initialized(bool(x.detach().abs().amax() > 0))

    def forward(self, v: Tensor, index: int) -> Tensor:
        x = self.grouped(v)
        self.maybe_init(x)
        s, b = self.slot(index), self.bits[index]
        basis = self.basis[s, :, :b]
        q, code, sorted_lv = nearest_level(x, basis, self.signed)
        out = _ste(x, q, sorted_lv, self.clip_grad).reshape(v.shape)
        if self.training:
            # Written after the output is computed; nothing autograd saved refers to the buffer
            # (the levels are fresh tensors and the basis never requires grad).
            with torch.no_grad():
                counts, sums = level_stats(x, code, 2**b)
                self.basis[s, :, :b] = solve_basis(counts, sums, basis, self.signed, self.momentum)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The channel count is only known after the first tensor; take it from the checkpoint.
        stored = state_dict.get(prefix + "basis")
        if stored is not None and stored.shape != self.basis.shape:
            if stored.dim() == 3 and (stored.shape[0], stored.shape[2]) == (
                self.basis.shape[0],
                self.basis.shape[2],
            ):
                self.basis = self.basis.new_zeros(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, signed={self.signed}, per_channel={self.per_channel}, "
            f"momentum={self.momentum}"
        )


class LQNetsWeight(LQNetsQuantizer):
    """LQ-Nets weights: codes in ``{-1, 1}^k``, a basis per output channel by default (paper)."""

    def __init__(
        self,
        bits: tuple[int, ...],
        share: bool = False,
        per_channel: bool = True,
        momentum: float = MOMENTUM,
    ) -> None:
        # Plain straight-through gradient for weights, as LQ-Nets.
        super().__init__(bits, True, share, per_channel, momentum, clip_grad=False)


class LQNetsActivation(LQNetsQuantizer):
    """LQ-Nets activations: one basis per layer, codes in ``{0, 1}^k`` (``{-1, 1}^k`` if signed)."""

    def __init__(
        self,
        bits: tuple[int, ...],
        signed: bool = False,
        share: bool = False,
        momentum: float = MOMENTUM,
    ) -> None:
        super().__init__(bits, signed, share, per_channel=False, momentum=momentum, clip_grad=True)
