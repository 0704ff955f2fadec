"""Routing samples by key: each group of samples through its own branch, outputs in input order.

Routed inference runs this at every dynamic layer, so the copies matter. Samples are
gathered once with one permutation: the groups are then slices of one private copy, which
the branches may overwrite (the activation quantizer works in place on them, so the gather
costs no extra pass over the data). Each group's output is written straight to its rows
of the result. Rows are moved through 2-d ``[B, -1]`` views in the tensor's storage order:
``index_select`` on such a view is a plain block copy, while on a 4-d ``channels_last``
tensor it takes a generic strided kernel, several times slower.
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
    groups, rows = take_rows(x, order).split(counts), order.split(counts)
    out = None
    for k in used:
        y = branch(k, groups[k], True)
        if out is None:
            shape = (x.shape[0], *y.shape[1:])
            out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_format(y))
        put_rows(out, rows[k], y)
    return out
