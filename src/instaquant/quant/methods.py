"""Quantizer modules: one per method and operand, holding learned parameters per candidate.

A quantizer is built for a tuple of candidate bit-widths and called as
``q(tensor, index)``, ``index`` being the candidate's position in that tuple.
With ``share=True`` all candidates use one learned clip/step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F_q
from . import inference as I_q

METHODS = ("dorefa", "pact", "lsq", "lqnets")


class Quantizer(nn.Module):
    """Base class: candidate bit-widths and the per-candidate parameter slot."""

    def __init__(self, bits: tuple[int, ...], share: bool = False) -> None:
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.share = share
        # The bit-widths as a tensor, for per-row quantization; moves with the module.
        self.register_buffer("bit_table", torch.tensor(self.bits), persistent=False)

    @property
    def num_slots(self) -> int:
        return 1 if self.share else len(self.bits)

    # Whether a quantizer is signed is decided at conversion (from the example input), not
    # learned: it travels in the state dict as ``signed_input`` so that weights trained with one
    # plan cannot load silently into a model built with the other.
    SIGNED_KEY = "signed_input"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if hasattr(self, "signed"):
            destination[prefix + self.SIGNED_KEY] = torch.tensor(bool(self.signed))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + self.SIGNED_KEY
        saved = state_dict.get(key)
        if saved is not None and hasattr(self, "signed") and bool(saved) != bool(self.signed):
            word = {True: "signed", False: "unsigned"}
            error_msgs.append(
                f"{prefix.rstrip('.')} quantizes {word[bool(saved)]} values in the checkpoint "
                f"but {word[bool(self.signed)]} ones in this model (the signed plan comes from "
                "the conversion example: convert with the same example, or pass signed=)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:  # not a parameter or buffer: checked above
            unexpected_keys.remove(key)

    def slot(self, index: int) -> int:
        return 0 if self.share else index

    def infer(self, x: Tensor, index: int, inplace: bool = False) -> Tensor:
        """The quantized value when no gradient is needed; with ``inplace`` it may overwrite ``x``.

        The same value as ``self(x, index)``; quantizers with a leaner evaluation form
        (:mod:`.inference`) override this.
        """
        return self(x, index)

    def infer_rows(self, x: Tensor, index: Tensor, inplace: bool = False) -> Tensor:
        """Row ``b`` of ``x`` quantized with candidate ``index[b]`` (no gradient needed).

        This default runs :meth:`infer` on each candidate's rows: on slices when the rows come
        grouped by candidate (routing sorts them), gathered copies otherwise. Element-wise
        quantizers override it with one pass over all rows.
        """
        out = x if inplace else torch.empty_like(x)
        runs, counts = (t.tolist() for t in torch.unique_consecutive(index, return_counts=True))
        if len(set(runs)) == len(runs):  # grouped: each candidate's rows are one slice
            for k, rows, dest in zip(runs, x.split(counts), out.split(counts), strict=True):
                q = self.infer(rows, k, inplace=inplace)
                if q.data_ptr() != dest.data_ptr():
                    dest.copy_(q)
            return out
        for k in set(runs):
            rows = (index == k).nonzero().squeeze(1)
            out.index_copy_(0, rows, self.infer(x.index_select(0, rows), k, inplace=True))
        return out

    def per_row(self, values: Tensor, index: Tensor, like: Tensor) -> Tensor:
        """``values[slot(index[b])]`` per row, shaped ``[B, 1, ...]`` to broadcast over ``like``."""
        rows = torch.zeros_like(index) if self.share else index
        return values[rows].reshape(-1, *[1] * (like.dim() - 1))

    def row_bits(self, index: Tensor, like: Tensor) -> Tensor:
        """Each row's bit-width (integers), shaped ``[B, 1, ...]`` to broadcast over ``like``."""
        return self.bit_table[index].reshape(-1, *[1] * (like.dim() - 1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, share={self.share}"


class DoReFaWeight(Quantizer):
    """DoReFa weight quantizer (no learned parameters)."""

    def forward(self, w: Tensor, index: int) -> Tensor:
        return F_q.dorefa_weight(w, self.bits[index])


class DoReFaActivation(Quantizer):
    """DoReFa activation quantizer: clamp to [0, 1] (or [-1, 1] when signed)."""

    def __init__(self, bits: tuple[int, ...], signed: bool = False, share: bool = False) -> None:
        super().__init__(bits, share)
        self.signed = signed

    def forward(self, x: Tensor, index: int) -> Tensor:
        return F_q.dorefa_activation(x, self.bits[index], self.signed)

    def infer(self, x: Tensor, index: int, inplace: bool = False) -> Tensor:
        return I_q.dorefa_activation(x, self.bits[index], self.signed, inplace)

    def infer_rows(self, x: Tensor, index: Tensor, inplace: bool = False) -> Tensor:
        return I_q.dorefa_activation(x, self.row_bits(index, x), self.signed, inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, signed={self.signed}"


class InitFlags:
    """A per-slot ``initialized`` buffer whose "all set" answer is remembered per version of
    the buffer, so that asking waits for the GPU only after the flags changed."""

    initialized: Tensor
    _ready_at: tuple[int, int] | None = None

    def _flags_version(self) -> tuple[int, int]:
        return (self.initialized.data_ptr(), self.initialized._version)

    def all_initialized(self) -> bool:
        """Whether every slot is set (a host wait only when the buffer changed since last asked)."""
        if self.__dict__.get("frozen_ready"):  # checked once for export: no tensor reads
            return True
        if self._ready_at == self._flags_version():
            return True
        if bool(self.initialized.all()):
            self._ready_at = self._flags_version()
            return True
        return False

    def set_initialized(self, value: bool) -> None:
        """Mark every slot set (or unset); a ``True`` is remembered without another wait."""
        self.initialized.fill_(value)
        self._ready_at = self._flags_version() if value else None


class _LazyInit(InitFlags, Quantizer):
    """A quantizer whose parameter per slot is set from the first tensor it sees.

    The ``initialized`` buffer travels with the state dict, so a loaded model is
    never re-initialised.
    """

    def __init__(self, bits: tuple[int, ...], share: bool = False) -> None:
        super().__init__(bits, share)
        self.register_buffer("initialized", torch.zeros(self.num_slots, dtype=torch.bool))

    def initial_value(self, v: Tensor, index: int) -> Tensor:
        raise NotImplementedError

    def maybe_init(self, param: nn.Parameter, v: Tensor) -> None:
        """Set every slot at once on the first call (later in-place writes would break autograd)."""
        if self.all_initialized():
            return
        with torch.no_grad():
            for s in range(self.num_slots):
                if not bool(self.initialized[s]):
                    index = len(self.bits) // 2 if self.share else s
                    param[s] = self.initial_value(v, index)
            self.set_initialized(True)


class PACTActivation(_LazyInit):
    """PACT: learnable clip α per candidate, initialised from the first batch.

    ``alpha_init`` fixes the initial α instead (the PACT paper uses 10).
    """

    def __init__(
        self,
        bits: tuple[int, ...],
        signed: bool = False,
        share: bool = False,
        alpha_init: float | None = None,
    ) -> None:
        super().__init__(bits, share)
        self.signed = signed
        self.alpha = nn.Parameter(torch.full((self.num_slots,), alpha_init or 1.0))
        if alpha_init is not None:
            self.initialized.fill_(True)

    def initial_value(self, v: Tensor, index: int) -> Tensor:
        # A high quantile of |x| rather than its max: one outlier should not set the range.
        flat = v.detach().abs().flatten().float()
        stride = max(1, flat.numel() // (1 << 20))
        return torch.quantile(flat[::stride], 0.999).clamp_min(1e-3)

    def forward(self, x: Tensor, index: int) -> Tensor:
        self.maybe_init(self.alpha, x)
        alpha = self.alpha[self.slot(index)]
        return F_q.pact_activation(x, alpha, self.bits[index], self.signed)

    def infer(self, x: Tensor, index: int, inplace: bool = False) -> Tensor:
        self.maybe_init(self.alpha, x)
        alpha = self.alpha[self.slot(index)]
        return I_q.pact_activation(x, alpha, self.bits[index], self.signed, inplace)

    def infer_rows(self, x: Tensor, index: Tensor, inplace: bool = False) -> Tensor:
        self.maybe_init(self.alpha, x)
        alpha = self.per_row(self.alpha, index, x)
        return I_q.pact_activation(x, alpha, self.row_bits(index, x), self.signed, inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, signed={self.signed}"


class LSQQuantizer(_LazyInit):
    """LSQ for weights (signed) or activations (unsigned, or signed where inputs can be negative)."""

    def __init__(self, bits: tuple[int, ...], signed: bool, share: bool = False) -> None:
        super().__init__(bits, share)
        self.signed = signed
        for b in self.bits:
            F_q.lsq_bounds(b, signed)  # fail early on signed 1-bit
        self.step = nn.Parameter(torch.ones(self.num_slots))

    def initial_value(self, v: Tensor, index: int) -> Tensor:
        return F_q.lsq_init_step(v, self.bits[index], self.signed)

    # Elements of v that the step's gradient scale counts: all (weights) or one sample's.
    per_sample = False

    def forward(self, v: Tensor, index: int) -> Tensor:
        self.maybe_init(self.step, v)
        features = v[0].numel() if self.per_sample and v.dim() > 1 else None
        return F_q.lsq(v, self.step[self.slot(index)], self.bits[index], self.signed, features)

    def infer(self, v: Tensor, index: int, inplace: bool = False) -> Tensor:
        self.maybe_init(self.step, v)
        return I_q.lsq(v, self.step[self.slot(index)], self.bits[index], self.signed, inplace)

    def infer_rows(self, v: Tensor, index: Tensor, inplace: bool = False) -> Tensor:
        self.maybe_init(self.step, v)
        step = self.per_row(self.step, index, v)
        return I_q.lsq(v, step, self.row_bits(index, v), self.signed, inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, signed={self.signed}"


class LSQWeight(LSQQuantizer):
    """LSQ weight quantizer (signed); the step is set from the weight on first use."""

    def __init__(self, bits: tuple[int, ...], share: bool = False) -> None:
        super().__init__(bits, signed=True, share=share)


class LSQActivation(LSQQuantizer):
    """LSQ activation quantizer; the step is set from the first batch it sees. Its gradient
    scale counts one sample's features (N_F), so it does not depend on the batch size."""

    per_sample = True

    def __init__(self, bits: tuple[int, ...], signed: bool = False, share: bool = False) -> None:
        super().__init__(bits, signed=signed, share=share)


def min_bits(method: str, operand: str, signed: bool = True) -> int:
    """The smallest bit-width ``method`` supports for ``operand`` ('weight' or 'activation')."""
    if method == "lsq" and (operand == "weight" or signed):
        return 2
    return 1  # LQ-Nets: one basis element gives the two levels ±v (or 0, v)


def make_weight_quantizer(method: str, bits: tuple[int, ...], share: bool = False) -> Quantizer:
    """The weight quantizer of ``method`` for candidate ``bits``."""
    if method in ("dorefa", "pact"):
        return DoReFaWeight(bits, share)
    if method == "lsq":
        return LSQWeight(bits, share)
    if method == "lqnets":
        from .lqnets import LQNetsWeight  # lqnets builds on Quantizer above

        return LQNetsWeight(bits, share)
    raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(METHODS)}")


def make_activation_quantizer(
    method: str, bits: tuple[int, ...], signed: bool, share: bool = False
) -> Quantizer:
    """The activation quantizer of ``method`` for candidate ``bits``; ``signed`` for inputs < 0."""
    if method == "dorefa":
        return DoReFaActivation(bits, signed, share)
    if method == "pact":
        return PACTActivation(bits, signed, share)
    if method == "lsq":
        return LSQActivation(bits, signed, share)
    if method == "lqnets":
        from .lqnets import LQNetsActivation

        return LQNetsActivation(bits, signed, share)
    raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(METHODS)}")
