"""Evaluation: accuracy, per-sample BitOPs and bit statistics, all-reduced under DDP."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .config import UserError
from .convert import DynamicQuantModel, QuantModel
from .distributed import DistContext

PER_SAMPLE_KEYS = ("bitops", "bits_w", "bits_a", "pred", "label", "loss", "prob")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_sample: dict[str, Tensor] = field(default_factory=dict)


def reference_bitops(model: nn.Module, ref_bits: int) -> float | None:
    return model.static_bitops(ref_bits) if isinstance(model, QuantModel) else None


def _no_choices(model: nn.Module) -> Tensor | None:
    """Zero counts of a dynamic model's choices, ``[L, K]`` (``[L, 2, K]`` when separate).

    Every rank starts from these, not None: a rank whose shard is empty must still join the
    all_reduce of the counts.
    """
    if not isinstance(model, DynamicQuantModel):
        return None
    layers, k = model.dynamic_macs.numel(), len(model.spec.bits)
    shape = (layers, 2, k) if model.spec.separate else (layers, k)
    return torch.zeros(shape, dtype=torch.float64)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    ref_bits: int,
    per_sample: bool = False,
    progress: bool = False,
    ctx: DistContext | None = None,
) -> EvalResult:
    """Top-1/top-5, loss and (quantized models) per-sample BitOPs and bit statistics.

    Under DDP each rank evaluates its shard and the sums are all-reduced, so every
    rank returns the metrics of the whole set.
    """
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    # Sums reduced across ranks: n, loss, top1, top5, bitops, bits.
    sums = torch.zeros(6, dtype=torch.float64)
    lo, hi = (
        torch.tensor([math.inf], dtype=torch.float64),
        torch.tensor([-math.inf], dtype=torch.float64),
    )
    keep: dict[str, list[Tensor]] = {k: [] for k in PER_SAMPLE_KEYS}
    choice_counts = _no_choices(model)
    ref = reference_bitops(model, ref_bits)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += y.shape[0]
        sums[1] += float(losses.sum())
        sums[2] += int((topk[:, 0] == y).sum())
        sums[3] += int((topk == y[:, None]).any(1).sum())
        if per_sample:
            keep["pred"].append(topk[:, 0].cpu())
            keep["label"].append(y.cpu())
            keep["loss"].append(losses.cpu())
            keep["prob"].append(logits.softmax(1).max(1).values.cpu())
        rec = getattr(model, "last", None)
        if rec is not None:
            bitops = rec.bitops.double().cpu()
            sums[4] += float(bitops.sum())
            sums[5] += float(((rec.bits_w + rec.bits_a) / 2).double().mean(1).sum())
            lo = torch.minimum(lo, bitops.min().view(1))
            hi = torch.maximum(hi, bitops.max().view(1))
            if per_sample:
                keep["bitops"].append(bitops)
                keep["bits_w"].append(rec.bits_w.cpu())
                keep["bits_a"].append(rec.bits_a.cpu())
            if rec.selection is not None:
                sel = rec.selection.sum(0).double().cpu()  # [L, K] or [L, 2, K]
                choice_counts = sel if choice_counts is None else choice_counts + sel
    model.train(was_training)
    for t, op in ((sums, "sum"), (lo, "min"), (hi, "max")):
        t.copy_(ctx.all_reduce(t.to(ctx.device), op).cpu())
    if choice_counts is not None:
        choice_counts = ctx.all_reduce(choice_counts.to(ctx.device)).cpu()
    n = float(sums[0])
    if n == 0:
        raise UserError("the evaluation set is empty")
    metrics: dict[str, Any] = {
        "top1": 100.0 * float(sums[2]) / n,
        "top5": 100.0 * float(sums[3]) / n,
        "loss": float(sums[1]) / n,
        "samples": int(n),
    }
    if ref is not None:
        mean = float(sums[4]) / n
        metrics.update(
            bitops_mean=mean,
            bitops_min=float(lo),
            bitops_max=float(hi),
            bitops_rel=mean / ref,
            bits_mean=float(sums[5]) / n,
        )
    if choice_counts is not None:
        metrics["candidate_fraction"] = (
            choice_counts / choice_counts.sum(-1, keepdim=True)
        ).tolist()
    out = {k: torch.cat(v) for k, v in keep.items() if v}
    return EvalResult(metrics, out)
