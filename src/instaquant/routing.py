"""Routing samples by key: each group of samples through its own branch, outputs in input order.

Routed inference runs this at every dynamic layer, so the copies matter. Samples are
gathered once with one permutation (the groups are then slices, which the branches may
overwrite: the activation quantizer works in place on them, so the gather costs no extra
pass), and the group outputs are concatenated and put back with the inverse permutation. Row gathers go through a 2-d ``[B, -1]`` view in the tensor's
storage order, for which ``index_select`` is a plain block copy; on a ``channels_last``
tensor ``index_select`` and ``index_copy_`` take a generic strided kernel, several times
slower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-d tensor stored ``channels_last`` (and not also plainly contiguous)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0, in ``x``'s memory layout."""
    if is_channels_last(x):
        n, (C, H, W) = index.numel(), x.shape[1:]
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # a view: NHWC is contiguous
        return flat.index_select(0, index).view(n, H, W, C).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def route(
    x: Tensor, key: Tensor, num_keys: int, branch: Callable[[int, Tensor, bool], Tensor]
) -> Tensor:
    """``out[b] = branch(key[b], x[b:b+1], owned)`` for every sample ``b``, one call per key.

    ``owned`` tells the branch whether its rows are a private copy (gathered here) that it
    may overwrite, or ``x`` itself.
    """
    if x.shape[0] == 1:
        return branch(int(key), x, False)
    counts = torch.bincount(key, minlength=num_keys).tolist()
    used = [k for k, c in enumerate(counts) if c]
    if len(used) == 1:  # every sample chose the same branch: no copies
        return branch(used[0], x, False)
    order = torch.argsort(key, stable=True)
    groups = take_rows(x, order).split(counts)
    outputs = torch.cat([branch(k, groups[k], True) for k in used])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return take_rows(outputs, inverse)
