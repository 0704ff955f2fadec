"""Routing samples by key: each group of samples through its own branch, outputs in input order.

Routed inference runs this at every dynamic layer, so the copies and the number of
operator calls matter. Samples are gathered once with one permutation into a private
copy, which the activation quantizer overwrites in one pass per operation with each row's
own candidate (so the gather replaces the quantizer's first copy instead of adding one);
the groups are then slices of it, and each group's output is written straight to its rows
of the result. Rows are moved through 2-d ``[B, -1]`` views in the tensor's storage order:
``index_select`` on such a view is a plain block copy, while on a 4-d ``channels_last``
tensor it takes a generic strided kernel, several times slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RoutePlan:
    """How one layer splits its batch: each sample's key, the samples per key, the sort order."""

    key: Tensor  # [B]
    counts: list[int]  # samples per key
    order: Tensor  # [B], samples sorted by key (stable)
    sorted_key: Tensor  # key[order]


def choice_keys(sel_w: Tensor, sel_a: Tensor | None, num_candidates: int) -> tuple[Tensor, int]:
    """The routing key of one-hot choices over the last dimension, and how many keys there are.

    Joint choice (``sel_a`` is ``None``): the candidate. Separate choices: the (weight,
    activation) pair, ``w * K + a``.
    """
    key = sel_w.argmax(dim=-1)
    if sel_a is None:
        return key, num_candidates
    return key * num_candidates + sel_a.argmax(dim=-1), num_candidates * num_candidates


def plan_layers(keys: Tensor, num_keys: int) -> list[RoutePlan]:
    """The plans of all layers from their keys ``[B, L]``, in a few calls for the whole network.

    A model computes these once per forward instead of every layer sorting and counting its
    own keys (and waiting for the count): the per-layer calls showed at small batch sizes.
    """
    counts = F.one_hot(keys, num_keys).sum(0).tolist()  # [L][num_keys]; the only sync
    order = torch.argsort(keys, dim=0, stable=True)
    sorted_keys = keys.gather(0, order).t().contiguous()
    by_layer, order = keys.t().contiguous(), order.t().contiguous()
    return [
        RoutePlan(by_layer[i], counts[i], order[i], sorted_keys[i]) for i in range(keys.shape[1])
    ]


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-d tensor stored ``channels_last`` (and not also plainly contiguous)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _rows(x: Tensor) -> Tensor:
    """A ``[B, -1]`` view of ``x``, one row per sample in storage order."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC is contiguous: a view
    return x.view(x.shape[0], -1)


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0, in ``x``'s memory layout."""
    if is_channels_last(x):
        n, (C, H, W) = index.numel(), x.shape[1:]
        return _rows(x).index_select(0, index).view(n, H, W, C).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def put_rows(out: Tensor, index: Tensor, rows: Tensor) -> None:
    """``out[index] = rows`` along dim 0; both dense in the same layout."""
    if out.is_contiguous() or is_channels_last(out):
        _rows(out).index_copy_(0, index, _rows(rows.contiguous(memory_format=_format(out))))
    else:
        out.index_copy_(0, index, rows)


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def plan_keys(key: Tensor, num_keys: int) -> RoutePlan:
    """The plan of one layer from its keys ``[B]`` (when no model planned it beforehand)."""
    return plan_layers(key[:, None], num_keys)[0]


def route(
    x: Tensor,
    plan: RoutePlan,
    quantize: Callable[[Tensor, int | Tensor, bool], Tensor],
    branch: Callable[[int, Tensor], Tensor],
) -> Tensor:
    """``out[b] = branch(key[b], quantize(x[b], key[b]))`` for every sample ``b``, ``key = plan.key``.

    ``quantize(rows, keys, owned)`` gets either one key (an int) for all its rows, or one
    key per row (a tensor, rows sorted by key) when the batch is split; ``owned`` says
    whether the rows are a private copy (gathered here) that it may overwrite, or ``x``
    itself. ``branch`` runs once per distinct key, on that key's rows.
    """
    used = [k for k, c in enumerate(plan.counts) if c]
    if len(used) == 1:  # every sample chose the same branch (batch 1 included): no copies
        return branch(used[0], quantize(x, used[0], False))
    quantized = quantize(take_rows(x, plan.order), plan.sorted_key, True)
    groups, rows = quantized.split(plan.counts), plan.order.split(plan.counts)
    out = None
    for k in used:
        y = branch(k, groups[k])
        if out is None:
            shape = (x.shape[0], *y.shape[1:])
            out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_format(y))
        put_rows(out, rows[k], y)
    return out
