"""BatchNorm per candidate ("switchable BN", as in AdaBits and Any-Precision networks).

A convolution's output statistics change with its bit-width, so one BatchNorm shared by all
candidates normalizes each of them a little wrongly. A :class:`SwitchableBatchNorm2d` holds K
independent copies of a BatchNorm (running statistics and affine parameters each), and every
sample goes through the copy of the candidate its layer chose:

- training (batch statistics): candidate k's BN normalizes the rows that chose k with those
  rows' statistics and updates only its own running statistics;
- evaluation (running statistics): ``out[b] = BN_{k_b}(x[b])``, one per-row affine pass.

:func:`find_following_bns` pairs BatchNorms with the convolutions whose output they read, and
:func:`swap_switchable_bns` replaces them; the owner then hands each one the candidate index of
its convolution's layer with ``set_selection`` before every forward.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..cost import forward_with_hooks
from .routing import plan_keys, take_rows

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class SwitchableBatchNorm(nn.Module):
    """K copies of a BatchNorm, one per candidate; each sample normalized by its candidate's.

    Before each forward the owner calls ``set_selection(index)`` with a LongTensor ``[B]`` of
    candidate indices. The selection is a routing decision: gradients flow to the input and to
    each candidate's affine parameters as the per-row computation implies, never to whatever
    produced the index (a bit controller gets its gradient through the dynamic layers).

    In training mode a candidate with no rows is skipped (its running statistics are left
    alone); one with a single row gets that sample's statistics, as ``F.batch_norm`` on a batch
    of one, and raises as it does when that leaves only one value per channel (spatial 1x1).
    """

    _bn_type: type[nn.modules.batchnorm._BatchNorm] = nn.modules.batchnorm._BatchNorm
    selection: Tensor | None

    def __init__(self, bns: list[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        self.bns = nn.ModuleList(bns)
        self.selection = None

    @property
    def num_candidates(self) -> int:
        return len(self.bns)

    @classmethod
    def from_bn(
        cls, bn: nn.modules.batchnorm._BatchNorm, num_candidates: int
    ) -> SwitchableBatchNorm:
        """K copies of ``bn``'s state: until trained apart it computes exactly what ``bn`` did."""
        if not isinstance(bn, cls._bn_type):
            raise TypeError(f"{cls.__name__} needs a {cls._bn_type.__name__}, got {type(bn)}")
        if type(bn).forward is not cls._bn_type.forward:
            # The evaluation path computes BatchNorm itself; a custom forward would be skipped.
            raise ValueError(f"{type(bn).__name__} has its own forward, which would not run")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
        layer = cls([copy.deepcopy(bn) for _ in range(num_candidates)])
        return layer.train(bn.training)

    def set_selection(self, index: Tensor | None) -> None:
        """This forward's candidate per sample (LongTensor ``[B]``); ``None`` clears it."""
        # Straight to the instance dict, as the dynamic layers do: ``nn.Module.__setattr__``
        # is slow enough to show when a model sets every layer each forward.
        self.__dict__["selection"] = index

    def _index(self, x: Tensor) -> Tensor:
        index = self.selection
        if index is None:
            raise RuntimeError(
                "switchable BatchNorm called without a selection: run it inside its model or "
                "call set_selection(index) with a LongTensor [B] of candidate indices"
            )
        if index.dim() != 1 or index.dtype != torch.long:
            raise RuntimeError(
                "selection must be a LongTensor [B] of candidate indices (one-hot choices: "
                f"use .argmax(-1)); got {index.dtype} of shape {tuple(index.shape)}"
            )
        if index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"selection has {index.shape[0]} samples but the input has {x.shape[0]}"
            )
        return index

    def pin(self, k: int) -> None:
        """Deployment at fixed bits: in evaluation every sample goes through candidate ``k``'s
        BatchNorm, whatever the selection says (for frozen copies that are exported)."""
        self.__dict__["pinned"] = int(k)

    def keep_pinned_only(self) -> None:
        """Drop every candidate's BatchNorm but the pinned one, which becomes candidate 0 (a
        frozen copy at fixed bits: the others' parameters would be unread inputs)."""
        pinned = self.__dict__.get("pinned")
        if pinned is None:
            raise RuntimeError("keep_pinned_only needs a pinned candidate: call pin(k) first")
        self.bns = nn.ModuleList([self.bns[pinned]])
        self.pin(0)

    def forward(self, x: Tensor) -> Tensor:
        pinned = self.__dict__.get("pinned")
        if pinned is not None and not self.training:  # fixed bits (export): one candidate's BN
            return self.bns[pinned](x)
        index = self._index(x)
        if self.__dict__.get("indexed") and not self.training:
            # Graph-static execution (instaquant.nn.indexed): no host sync, one per-row affine.
            return self._running_stats_forward(x, index)
        if index.numel() == 0:
            return self.bns[0](x)
        # One host sync gives both the range check and whether the batch is on one candidate.
        lo, hi = torch.stack(torch.aminmax(index)).tolist()
        if lo < 0 or hi >= self.num_candidates:
            raise RuntimeError(
                f"selection holds candidate indices in [{lo}, {hi}], "
                f"outside [0, {self.num_candidates - 1}]"
            )
        if lo == hi:  # every sample on one candidate (batch 1 included): no copies
            return self.bns[lo](x)
        if self.training or self.bns[0].running_mean is None:  # batch statistics, as nn.BatchNorm
            return self._batch_stats_forward(x, index)
        return self._running_stats_forward(x, index)

    def _batch_stats_forward(self, x: Tensor, index: Tensor) -> Tensor:
        """Each candidate's BN on its own rows (its statistics, its running-stat update)."""
        plan = plan_keys(index, self.num_candidates)
        groups = take_rows(x, plan.order).split(plan.counts)
        out = torch.cat([self.bns[k](g) for k, g in enumerate(groups) if g.shape[0]])
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(len(inverse), device=inverse.device)
        return take_rows(out, inverse)  # back to input order

    def _running_stats_forward(self, x: Tensor, index: Tensor) -> Tensor:
        """``BN_{k_b}(x[b])`` with running statistics as one per-row affine ``x·scale + shift``."""
        scale, shift = [], []
        for bn in self.bns:
            s = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                s = s * bn.weight
            b = -bn.running_mean * s
            scale.append(s)
            shift.append(b if bn.bias is None else b + bn.bias)
        row_shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))

        def per_row(t: list[Tensor]) -> Tensor:
            return torch.stack(t).to(x.dtype).index_select(0, index).view(row_shape)

        # A size-1-padded [B, C, 1, 1] operand keeps a channels_last input's layout.
        return torch.addcmul(per_row(shift), x, per_row(scale))

    def extra_repr(self) -> str:
        return f"num_candidates={self.num_candidates}"


class SwitchableBatchNorm2d(SwitchableBatchNorm):
    """A :class:`SwitchableBatchNorm` of ``BatchNorm2d`` copies (inputs ``[B, C, H, W]``)."""

    _bn_type = nn.BatchNorm2d


class SwitchableBatchNorm1d(SwitchableBatchNorm):
    """A :class:`SwitchableBatchNorm` of ``BatchNorm1d`` copies (inputs ``[B, C]``/``[B, C, L]``)."""

    _bn_type = nn.BatchNorm1d


def find_following_bns(
    model: nn.Module, example_input: Tensor, layer_names: list[str]
) -> dict[str, str]:
    """``{bn_name: layer_name}`` for each BatchNorm whose input is exactly a named layer's output.

    Runs ``example_input`` once (eval mode, no grad). A BatchNorm fed anything else (an
    activation of the layer's output, a sum) is not paired. Works on any model: the named
    layers may be plain ``nn.Conv2d`` or already quantized.
    """
    outputs: dict[int, tuple[str, Tensor]] = {}
    pairs: dict[str, str] = {}
    handles = []

    def after_layer(name: str):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            # The tensor is kept with its name so that its id cannot be reused by another.
            outputs[id(out)] = (name, out)

        return hook

    def before_bn(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            found = outputs.get(id(inputs[0]))
            if found is None or found[1] is not inputs[0]:
                return
            if pairs.setdefault(name, found[0]) != found[0]:
                raise ValueError(f"BatchNorm {name!r} reads both {pairs[name]!r} and {found[0]!r}")

        return hook

    hooked: set[int] = set()
    for name in layer_names:
        layer = model.get_submodule(name)
        if id(layer) not in hooked:  # a layer under several names: hooked once
            hooked.add(id(layer))
            handles.append(layer.register_forward_hook(after_layer(name)))
    switchable = [n for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)]
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{s}.") for s in switchable)  # already swapped
        if isinstance(module, _BATCH_NORMS) and not inside:
            handles.append(module.register_forward_pre_hook(before_bn(name)))
    forward_with_hooks(model, example_input, handles)
    return pairs


def swap_switchable_bns(
    model: nn.Module, pairs: dict[str, str], num_candidates: int
) -> dict[str, SwitchableBatchNorm]:
    """Replace each BatchNorm named in ``pairs`` (``{bn_name: layer_name}``) by a switchable one.

    Returns the new modules keyed by the layer each follows. A BatchNorm held under several
    attribute paths is replaced under all of them.
    """
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    swapped: dict[str, SwitchableBatchNorm] = {}
    for bn_name, layer_name in pairs.items():
        if layer_name in swapped:
            raise ValueError(f"layer {layer_name!r} is followed by more than one BatchNorm")
        bn = model.get_submodule(bn_name)
        cls = SwitchableBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else SwitchableBatchNorm1d
        new = cls.from_bn(bn, num_candidates)
        for name in names_of[id(bn)]:
            _set_module(model, name, new)
        swapped[layer_name] = new
    return swapped


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    # As convert._set_module; not imported from there, since convert will import this module.
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
