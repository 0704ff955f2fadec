"""Quantized matrix products inside a module's own forward: attention's q·kᵀ and attention·v.

The probe (:class:`~instaquant.products.ProductCounter`) records, per module, each product
call: a matmul (two operands) or a ``scaled_dot_product_attention`` (query, key, attention
weights, value). :func:`quantize_products` gives such a module one activation quantizer per
operand of each call (fixed bit-width) and, while the module runs, a function mode that
quantizes those operands before the product:

- a matmul multiplies its two quantized operands;
- ``scaled_dot_product_attention`` is written out, so that its attention weights exist to be
  quantized: ``softmax(Q(q)·Q(k)ᵀ·scale + mask)`` → ``Q(weights)`` → dropout → ``·Q(v)``.

Products run inside a ``Conv2d``/``Linear`` (a quantized layer's own arithmetic) are left
alone: each such layer pauses its owner's mode while it runs. Any module whose products the
probe saw can be quantized this way, whatever its code (our ViT, ``SplitAttention``, timm's
attention), as long as it runs the same products in the same order every forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..products import MATMULS, SDPA_OPERANDS, ProductInfo
from ..quant.methods import make_activation_quantizer

SDPA_KEYWORDS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class ProductQuantizers(nn.Module):
    """Activation quantizers for the operands of every product one module runs, per call."""

    def __init__(self, info: ProductInfo, method: str, bits: int) -> None:
        super().__init__()
        self.owner_name, self.bits = info.name, int(bits)
        self.kinds = [kind for kind, _ in info.calls]
        self.calls = nn.ModuleList(
            nn.ModuleList(make_activation_quantizer(method, (bits,), s) for s in signs)
            for _, signs in info.calls
        )
        self._next = 0  # the index of the owner's next product call in this forward
        self._paused = 0  # > 0 while a layer inside the owner runs

    def begin(self) -> None:
        self._next, self._paused = 0, 0
        mode = _QuantizingMode(self)
        mode.__enter__()
        self.__dict__["_mode"] = mode

    def end(self, finished: bool) -> None:
        """Leave the mode; after a forward that ``finished``, every product must have run
        (the ones that did not would still be counted in BitOPs)."""
        mode = self.__dict__.pop("_mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)
        if finished and self._next != len(self.kinds):
            raise RuntimeError(
                f"module {self.owner_name or '(model)'!r} ran {self._next} of the "
                f"{len(self.kinds)} products it ran at conversion ({', '.join(self.kinds)}); "
                "quantized products need the same products in the same order every forward"
            )

    def run(self, func, args: tuple, kwargs: dict) -> Tensor:
        """The product ``func(*args, **kwargs)`` with its operands quantized."""
        i = self._next
        kind = "sdpa" if func is F.scaled_dot_product_attention else "matmul"
        if i >= len(self.kinds) or self.kinds[i] != kind:
            seen = ", ".join(self.kinds) or "none"
            raise RuntimeError(
                f"module {self.owner_name or '(model)'!r} ran a {kind} as its product {i + 1}, "
                f"but at conversion its products were: {seen}; quantized products need the "
                "same products in the same order every forward"
            )
        self._next += 1
        quantize = [_quantize_fn(q) for q in self.calls[i]]
        if kind == "matmul":
            return func(quantize[0](args[0]), quantize[1](args[1]), *args[2:], **kwargs)
        return _attention(quantize, args, kwargs)

    def extra_repr(self) -> str:
        return f"owner={self.owner_name!r}, bits={self.bits}, calls={self.kinds}"


class _QuantizingMode(TorchFunctionMode):
    def __init__(self, owner: ProductQuantizers) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_product = func in MATMULS or func is F.scaled_dot_product_attention
        if not is_product or self.owner._paused:
            return func(*args, **kwargs)
        return self.owner.run(func, args, kwargs)


def _quantize_fn(quantizer: nn.Module):
    """``x ↦ Q(x)``: the lean evaluation form when no gradient is needed (same values)."""
    if torch.is_grad_enabled():
        return lambda x: quantizer(x, 0)
    return lambda x: quantizer.infer(x, 0)


def _attention(quantize: list, args: tuple, kwargs: dict) -> Tensor:
    """``scaled_dot_product_attention`` written out, with its four operands quantized."""
    names = (*SDPA_OPERANDS, *SDPA_KEYWORDS)
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    if given.get("enable_gqa"):
        raise ValueError("quantized attention products do not support enable_gqa=True")
    q, k, v = given["query"], given["key"], given["value"]
    scale = given.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = quantize[0](q) @ quantize[1](k).transpose(-2, -1) * scale
    mask = given.get("attn_mask")
    if given.get("is_causal"):
        L, S = scores.shape[-2:]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        # Boolean: True takes part in attention; float: added to the scores.
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    weights = quantize[2](scores.softmax(dim=-1))
    dropout = given.get("dropout_p", 0.0)
    if dropout:
        weights = F.dropout(weights, dropout, training=True)
    return weights @ quantize[3](v)


def _begin(module: nn.Module, args: tuple) -> None:
    module.product_quantizers.begin()


def _end(module: nn.Module, args: tuple, out) -> None:
    # Also called when the forward raised (``always_call``), then with ``out`` None.
    module.product_quantizers.end(finished=out is not None)


def _pause(module: nn.Module, args: tuple) -> None:
    module.__dict__["_product_owner"]._paused += 1


def _resume(module: nn.Module, args: tuple, out) -> None:
    module.__dict__["_product_owner"]._paused -= 1


def quantize_products(
    model: nn.Module, products: list[ProductInfo], method: str, bits: int
) -> list[str]:
    """Quantize, in place, the operands of every product in ``products`` (found by the probe
    on ``model``) at ``bits`` with ``method``'s activation quantizer; the owners' names."""
    # The probe credits a product to the innermost module running it, so none of an owner's
    # products runs inside a module below it: every module below pauses its nearest owner.
    owners = sorted(products, key=lambda p: p.name.count(".") + bool(p.name))  # outer first
    below: dict[int, nn.Module] = {}
    for info in owners:
        module = model.get_submodule(info.name)
        module.product_quantizers = ProductQuantizers(info, method, bits)
        module.register_forward_pre_hook(_begin)
        module.register_forward_hook(_end, always_call=True)
        for name, inner in module.named_modules():
            if name and not name.startswith("product_quantizers"):
                inner.__dict__["_product_owner"] = module.product_quantizers
                below[id(inner)] = inner
    for inner in below.values():
        inner.register_forward_pre_hook(_pause, prepend=True)
        inner.register_forward_hook(_resume, always_call=True)
    return [p.name for p in owners]
