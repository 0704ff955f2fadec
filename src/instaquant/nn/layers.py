"""Quantized layers: static (fixed bits) and dynamic (per-sample bits chosen by a selection).

A dynamic layer holds one weight/activation quantizer over its K candidate
bit-widths. Before each forward its owner sets ``layer.selection``: a one-hot
``[B, K]`` tensor (joint weight/activation choice) or a pair ``(sel_w, sel_a)``
(separate choices). Two executions give the same values:

- ``reference``: the straight-through mixture of the paper and official code,
  ``y = Σ_k m_k · op(Q^a_k(x), Q^w_k(W))`` (every branch computed).
- ``graph``: in evaluation mode without autograd each sample's candidate is selected by
  indexing (:mod:`~instaquant.nn.indexed`): the same operators whatever is chosen, no host
  sync, so ``torch.export`` and ONNX can take it; training as ``fast``.
- ``fast``: in evaluation mode without autograd each sample is routed to its
  selected branch only, with quantized weights cached per candidate; otherwise
  (training, or gradients wanted) on the CPU :func:`~instaquant.nn.fast_dynamic.mixture_forward` gives the
  mixture's value and exact gradients with the backward run on each sample's branch
  only, while on a GPU the mixture itself is faster and is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.methods import Quantizer, make_activation_quantizer, make_weight_quantizer
from .fast_dynamic import mixture_forward
from .indexed import indexed_activation, per_sample_conv, per_sample_linear, select_branch
from .routing import RoutePlan, choice_keys, plan_keys, route

Selection = Tensor | tuple[Tensor, Tensor]
EXECUTIONS = ("fast", "reference", "graph")


def _broadcast(m: Tensor, like: Tensor) -> Tensor:
    """Per-sample weights ``[B]`` shaped to multiply a ``[B, ...]`` tensor."""
    return m.reshape(m.shape[0], *([1] * (like.dim() - 1)))


class _QuantOp:
    """What static and dynamic layers share: how to apply the layer to a quantized input/weight."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def op(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError


class _ConvOp(_QuantOp, nn.Conv2d):
    def op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, self.bias)

    def per_sample_op(self, x: Tensor, weights: Tensor) -> Tensor:
        return per_sample_conv(self, x, weights)


class _LinearOp(_QuantOp, nn.Linear):
    def op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.bias)

    def per_sample_op(self, x: Tensor, weights: Tensor) -> Tensor:
        return per_sample_linear(self, x, weights)


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    dst.weight = src.weight
    if getattr(src, "bias", None) is not None:
        dst.bias = src.bias


def _place_like(weight: Tensor, *quantizers: nn.Module) -> None:
    """Quantizer parameters on the layer's device and in its floating dtype."""
    for q in quantizers:
        q.to(device=weight.device, dtype=weight.dtype)


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _linear_kwargs(lin: nn.Linear) -> dict:
    return dict(
        in_features=lin.in_features, out_features=lin.out_features, bias=lin.bias is not None
    )


# --------------------------------------------------------------------------- static


def _own_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of ``module`` and its children (a dict walk, no generators)."""
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            found += _own_tensors(child)
    return found


class _WeightCache:
    """Quantized weights per candidate, cached when no gradient is needed (evaluation).

    Entries are keyed on the tensors' version counters, which in-place updates bump. Fused
    optimizers (``fused=True``) and writes through ``.data`` bump none, so any forward that
    may train (training mode, or gradients enabled) also drops the cache; after changing
    weights by such a path outside training, call ``train()`` before evaluating again.
    """

    weight: nn.Parameter
    wq: Quantizer

    def quantized_weight(self, k: int) -> Tensor:
        """Candidate ``k``'s quantized weight, cached in evaluation mode."""
        frozen = self._buffers.get("frozen_weights")
        if frozen is not None:
            pinned = self.__dict__.get("pinned")
            if pinned is None:
                return frozen[k]
            if k != pinned[0]:
                raise RuntimeError(f"layer pinned to weight candidate {pinned[0]}, asked for {k}")
            return frozen[0]  # a pinned layer froze its one weight
        if self.training or torch.is_grad_enabled():
            self.drop_weight_cache()
            return self.wq(self.weight, k)
        cache = self.__dict__.setdefault("_wcache", {})
        # In-place updates (optimizer steps, load_state_dict) bump ``_version``.
        tracked = (self.weight, *_own_tensors(self.wq))
        key = tuple((t.data_ptr(), t._version) for t in tracked)
        hit = cache.get(k)
        if hit is not None and hit[0] == key:
            return hit[1]
        wq = self.wq(self.weight, k)
        cache[k] = (key, wq)
        return wq

    def drop_weight_cache(self) -> None:
        """Forget the cached quantized weights (a forward that may train calls this)."""
        self.__dict__.pop("_wcache", None)

    def freeze_weights(self) -> None:
        """Keep every candidate's quantized weight, stacked ``[K, ...]``, as a buffer (not
        saved in the state dict) that forwards use as is: the deployed form, whose graph
        holds the quantized weights as constants. ``train()`` drops it."""
        pinned = self.__dict__.get("pinned")
        keep = range(len(self.wq.bits)) if pinned is None else (pinned[0],)
        with torch.no_grad():
            stacked = torch.stack([self.wq(self.weight, k) for k in keep])
        self.register_buffer("frozen_weights", stacked, persistent=False)

    def stacked_weights(self) -> Tensor:
        """``[K, ...]``: every candidate's quantized weight (frozen, or quantized now)."""
        frozen = self._buffers.get("frozen_weights")
        if frozen is not None:
            return frozen
        parts = [self.quantized_weight(k) for k in range(len(self.wq.bits))]
        if self.training or torch.is_grad_enabled():
            return torch.stack(parts)
        # In evaluation the per-candidate weights come from the cache: stack them once too,
        # and again only when one of them was re-quantized (a new tensor).
        cache = self.__dict__.setdefault("_wcache", {})
        hit = cache.get("stack")
        if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
            return hit[1]
        stacked = torch.stack(parts)
        cache["stack"] = (parts, stacked)
        return stacked

    def train(self, mode: bool = True):  # type: ignore[override]
        # Training invalidates the cache; ``eval()`` keeps it, so a per-batch ``model.eval()``
        # in an evaluation loop does not requantize every weight (updates are caught by version).
        if mode:
            self.drop_weight_cache()
            self._buffers.pop("frozen_weights", None)
            self.__dict__.pop("pinned", None)
        return super().train(mode)


class _StaticMixin(_WeightCache):
    """Fixed bit-width: ``op(Q^a(x), Q^w(W))``."""

    wq: Quantizer
    aq: Quantizer
    bits: int

    def _setup(
        self, method: str, bits: int, signed_input: bool, share: bool, weight_bits: int | None
    ) -> None:
        self.bits = int(bits)
        self.weight_bits = self.bits if weight_bits is None else int(weight_bits)
        self.method = method
        self.wq = make_weight_quantizer(method, (self.weight_bits,), share)
        self.aq = make_activation_quantizer(method, (bits,), signed_input, share)
        _place_like(self.weight, self.wq, self.aq)

    def forward(self, x: Tensor) -> Tensor:
        xq = self.aq(x, 0) if torch.is_grad_enabled() else self.aq.infer(x, 0)
        return self.op(xq, self.quantized_weight(0))


class QConv2d(_StaticMixin, _ConvOp):
    """Conv2d with weights and input quantized at a fixed bit-width."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        method: str,
        bits: int,
        signed_input: bool,
        share: bool = False,
        weight_bits: int | None = None,
    ) -> QConv2d:
        layer = cls(**_conv_kwargs(conv), device=conv.weight.device, dtype=conv.weight.dtype)
        _copy_params(layer, conv)
        layer._setup(method, bits, signed_input, share, weight_bits)
        return layer


class QLinear(_StaticMixin, _LinearOp):
    """Linear with weights and input quantized at a fixed bit-width."""

    @classmethod
    def from_float(
        cls,
        lin: nn.Linear,
        method: str,
        bits: int,
        signed_input: bool,
        share: bool = False,
        weight_bits: int | None = None,
    ) -> QLinear:
        layer = cls(**_linear_kwargs(lin), device=lin.weight.device, dtype=lin.weight.dtype)
        _copy_params(layer, lin)
        layer._setup(method, bits, signed_input, share, weight_bits)
        return layer


# --------------------------------------------------------------------------- dynamic


class _DynamicMixin(_WeightCache):
    """Per-sample bit-width from ``self.selection`` (see the module docstring)."""

    wq: Quantizer
    aq: Quantizer
    bits: tuple[int, ...]
    selection: Selection | None
    execution: str
    op: Callable[[Tensor, Tensor], Tensor]

    def _setup(
        self,
        method: str,
        bits: tuple[int, ...],
        signed_input: bool,
        share: bool,
        execution: str,
        weight_bits: int | None = None,
    ) -> None:
        self.bits = tuple(int(b) for b in bits)
        self.weight_bits = None if weight_bits is None else int(weight_bits)
        self.method = method
        if weight_bits is None:
            self.wq = make_weight_quantizer(method, self.bits, share)
        else:  # candidate k's weight is the same one at weight_bits: one shared step/basis
            self.wq = make_weight_quantizer(method, (self.weight_bits,) * len(self.bits), True)
        self.aq = make_activation_quantizer(method, self.bits, signed_input, share)
        _place_like(self.weight, self.wq, self.aq)
        self.selection = None
        # Set by the owning model next to the selection when it has planned the routing of
        # every layer at once (``instaquant.nn.routing.plan_layers``); computed here otherwise.
        self.route_plan: RoutePlan | None = None
        self.execution = execution

    def set_selection(self, selection: Selection | None, plan: RoutePlan | None = None) -> None:
        """This forward's choice (and, when the model planned it, its routing); ``None`` clears."""
        # Plain attributes written straight to the instance dict: ``nn.Module.__setattr__``
        # checks parameters, buffers and modules first, which a model setting and clearing
        # every layer each forward paid for visibly at batch 1.
        self.__dict__["selection"] = selection
        self.__dict__["route_plan"] = plan

    def _selection(self) -> tuple[Tensor, Tensor, bool]:
        sel = self.selection
        if sel is None:
            raise RuntimeError(
                "dynamic layer called without a selection: run it inside a DynamicQuantModel "
                "or set layer.selection to a one-hot [B, K] tensor"
            )
        if isinstance(sel, tuple):
            return sel[0], sel[1], False
        return sel, sel, True

    def forward(self, x: Tensor) -> Tensor:
        sel_w, sel_a, joint = self._selection()
        if sel_w.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"selection has {sel_w.shape[0]} samples but the input has {x.shape[0]}"
            )
        if self.execution == "reference":
            return self.reference_forward(x, sel_w, sel_a, joint)
        # Routing gives each quantizer only its candidate's rows, so it serves evaluation only:
        # in training mode, stateful quantizers (LQ-Nets' lazy init and QEM step) must see the
        # whole batch for every candidate, as in the mixture, even without gradients.
        if self.training or self._needs_grad(x, sel_w, sel_a):
            self.drop_weight_cache()  # the weights may change without a version bump
            if x.device.type != "cpu":
                # On a GPU the row-split backward measured slower than the mixture: it waits for
                # the host to learn each layer's split, and its many small kernels leave the
                # GPU idle (docs/benchmarks.md, "On a GPU"). The values are the same.
                return self.reference_forward(x, sel_w, sel_a, joint)
            return mixture_forward(self, x, sel_w, sel_a, joint)
        if self.execution == "graph":
            return self.indexed_forward(x, sel_w, sel_a, joint)
        return self.routed_forward(x, sel_w, sel_a)

    def pin(self, k_w: int, k_a: int) -> None:
        """Deployment at fixed bits: graph-static forwards run weight candidate ``k_w`` and
        activation candidate ``k_a`` for every sample, as a static layer would, whatever the
        selection says, and :meth:`freeze_weights` keeps that one weight. For frozen copies
        that are exported, never trained (``train()`` unpins)."""
        self.__dict__["pinned"] = (int(k_w), int(k_a))

    def indexed_forward(self, x: Tensor, sel_w: Tensor, sel_a: Tensor, joint: bool) -> Tensor:
        """Each sample's candidate selected by indexing (no data-dependent Python, no host
        sync): the graph-static form of routed inference, same values."""
        pinned = self.__dict__.get("pinned")
        if pinned is not None:  # fixed bits: one candidate, the static layer's operators
            return self.op(self.aq.infer(x, pinned[1]), self.quantized_weight(pinned[0]))
        k_w = sel_w.argmax(-1)
        if joint and x.shape[0] == 1 and self.__dict__.get("branch_select"):
            # Export at batch 1: a branch per candidate with constant weights (ONNX If).
            def branch(k: int, t: Tensor) -> Tensor:
                return self.op(self.aq.infer(t, k), self.quantized_weight(k))

            return select_branch(k_w[0], len(self.bits), branch, x)
        k_a = k_w if joint else sel_a.argmax(-1)
        xq = indexed_activation(self.aq, x, k_a)
        return self.per_sample_op(xq, self.stacked_weights().index_select(0, k_w))

    def candidate_weights(self) -> list[Tensor]:
        """Every candidate's quantized weight, with autograd (a forward that may train); with
        fixed ``weight_bits`` one quantization, the same tensor for every candidate."""
        if self.weight_bits is not None:
            return [self.wq(self.weight, 0)] * len(self.bits)
        return [self.wq(self.weight, k) for k in range(len(self.bits))]

    def _needs_grad(self, x: Tensor, sel_w: Tensor, sel_a: Tensor) -> bool:
        """Whether autograd may ask this call for gradients (routing alone cannot give them all)."""
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or sel_w.requires_grad or sel_a.requires_grad:
            return True
        return any(p.requires_grad for p in self.parameters())

    def reference_forward(self, x: Tensor, sel_w: Tensor, sel_a: Tensor, joint: bool) -> Tensor:
        """The straight-through mixture over all K branches (paper / official code)."""
        K, weights = len(self.bits), self.candidate_weights()
        if joint:
            out = None
            for k in range(K):
                y = self.op(self.aq(x, k), weights[k])
                term = _broadcast(sel_w[:, k], y) * y
                out = term if out is None else out + term
            return out
        x_mix = sum(_broadcast(sel_a[:, j], x) * self.aq(x, j) for j in range(K))
        out = None
        for i in range(K):
            y = self.op(x_mix, weights[i])
            term = _broadcast(sel_w[:, i], y) * y
            out = term if out is None else out + term
        return out

    def routed_forward(self, x: Tensor, sel_w: Tensor, sel_a: Tensor) -> Tensor:
        """Each sample through its selected branch only (hard selections, no mixture gradient)."""
        K = len(self.bits)
        joint = sel_a is sel_w
        plan = self.route_plan
        if plan is None:  # not planned by the model: one key per sample, planned here
            plan = plan_keys(*choice_keys(sel_w, None if joint else sel_a, K))

        def quantize(rows: Tensor, k: int | Tensor, owned: bool) -> Tensor:
            ia = k if joint else k % K  # the activation candidate of key k
            if isinstance(ia, int):
                return self.aq.infer(rows, ia, inplace=owned)
            return self.aq.infer_rows(rows, ia, inplace=owned)

        def branch(k: int, xq: Tensor) -> Tensor:
            return self.op(xq, self.quantized_weight(k if joint else k // K))

        return route(x, plan, quantize, branch)

    def extra_repr(self) -> str:
        weights = "" if self.weight_bits is None else f", weight_bits={self.weight_bits}"
        return f"{super().extra_repr()}, bits={self.bits}{weights}, execution={self.execution}"


class DynamicQConv2d(_DynamicMixin, _ConvOp):
    """Conv2d whose bit-width is chosen per sample."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        method: str,
        bits: tuple[int, ...],
        signed_input: bool,
        share: bool = False,
        execution: str = "fast",
        weight_bits: int | None = None,
    ) -> DynamicQConv2d:
        layer = cls(**_conv_kwargs(conv), device=conv.weight.device, dtype=conv.weight.dtype)
        _copy_params(layer, conv)
        layer._setup(method, bits, signed_input, share, execution, weight_bits)
        return layer


class DynamicQLinear(_DynamicMixin, _LinearOp):
    """Linear whose bit-width is chosen per sample."""

    @classmethod
    def from_float(
        cls,
        lin: nn.Linear,
        method: str,
        bits: tuple[int, ...],
        signed_input: bool,
        share: bool = False,
        execution: str = "fast",
        weight_bits: int | None = None,
    ) -> DynamicQLinear:
        layer = cls(**_linear_kwargs(lin), device=lin.weight.device, dtype=lin.weight.dtype)
        _copy_params(layer, lin)
        layer._setup(method, bits, signed_input, share, execution, weight_bits)
        return layer


DYNAMIC_LAYERS = (DynamicQConv2d, DynamicQLinear)
STATIC_LAYERS = (QConv2d, QLinear)
