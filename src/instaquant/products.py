"""Matrix products that no Conv2d/Linear holds: attention's q·kᵀ and attention·v.

They are counted during the shape probe, per module, and listed as full-precision
MACs outside BitOPs, unless the conversion quantizes them (``product_bits``, see
:mod:`instaquant.nn.product_quant`): then each becomes a fixed-bit row of the layer plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


@dataclass
class ProductInfo:
    """The matrix products run inside one module (per sample)."""

    name: str  # the innermost module running them ("" for the model's own forward)
    macs: int
    # Per call, in order: "matmul" or "sdpa", and whether each operand held negative values
    # (matmul: a, b; sdpa: query, key, attention weights (never), value).
    calls: list[tuple[str, tuple[bool, ...]]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


def _matmul_macs(a: Tensor, out: Tensor) -> int:
    return out[0].numel() * a.shape[-1] if out.dim() > 1 else a.shape[-1]


def _sdpa_macs(q: Tensor, k: Tensor, v: Tensor) -> int:
    heads_queries = q[0].numel() // q.shape[-1]  # H * L
    return heads_queries * k.shape[-2] * (q.shape[-1] + v.shape[-1])


SDPA_OPERANDS = ("query", "key", "value")


def _negative(t: Tensor) -> bool:
    return bool((t < 0).any())


def sdpa_operands(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """query, key and value of a ``scaled_dot_product_attention`` call, however passed."""
    return tuple(args[i] if i < len(args) else kwargs[n] for i, n in enumerate(SDPA_OPERANDS))


MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}


class ProductCounter(TorchFunctionMode):
    """Within ``with``: the MACs of matrix products outside Conv2d/Linear modules of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stack: list[str] = []
        self.found: dict[str, ProductInfo] = {}
        self.handles: list = []

    def __enter__(self) -> ProductCounter:
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for h in self.handles:
            h.remove()

    def _enter(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            inside = isinstance(module, (nn.Conv2d, nn.Linear)) or (
                self.stack and self.stack[-1] is None
            )
            self.stack.append(None if inside else name)

        return hook

    def _leave(self, module: nn.Module, inputs: tuple, out) -> None:
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        where = self.stack[-1] if self.stack else ""
        if where is None:  # inside a Conv2d/Linear: its own MACs are counted elsewhere
            return out
        if func in MATMULS:
            a, b = args[0], args[1]
            self._add(where, _matmul_macs(a, out), ("matmul", (_negative(a), _negative(b))))
        elif func is F.scaled_dot_product_attention:
            q, k, v = sdpa_operands(args, kwargs)
            signs = (_negative(q), _negative(k), False, _negative(v))
            self._add(where, _sdpa_macs(q, k, v), ("sdpa", signs))
        return out

    def _add(self, name: str, macs: int, call: tuple[str, tuple[bool, ...]]) -> None:
        info = self.found.get(name)
        if info is None:
            self.found[name] = ProductInfo(name, macs, calls=[call])
        else:
            info.macs += macs
            info.calls.append(call)

    @property
    def products(self) -> list[ProductInfo]:
        return list(self.found.values())
