"""Training losses beside cross-entropy: distillation of a student's logits towards a
teacher's, and the ranking of images' BitOPs by how much bits help them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over the batch.

    The teacher's logits are detached: only the student learns. The ``T²`` factor keeps the
    gradient's scale independent of the temperature (Hinton et al.).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def rank_loss(cost: Tensor, gain: Tensor) -> Tensor:
    """``1 − Pearson(cost, rank(gain))`` over the batch: low when the images that gain most
    from more bits are the ones given the most ``cost``.

    ``cost [B]`` is differentiable (the controller's expected BitOPs); ``gain [B]`` is a
    detached score (the loss drop from the lowest to the highest candidate). Ranks make it
    blind to the gain's scale and outliers; the correlation makes it blind to the cost's
    scale, so only the order of the images is learned and the budget keeps setting the
    mean. Zero (still in the graph) when either side has no spread.
    """
    if cost.shape != gain.shape or cost.dim() != 1:
        raise ValueError(
            f"cost and gain must both be [B]; got {tuple(cost.shape)} and {tuple(gain.shape)}"
        )
    ranks = torch.argsort(torch.argsort(gain.detach())).to(cost.dtype)
    c = cost - cost.mean()
    r = ranks - ranks.mean()
    denom = torch.sqrt((c * c).sum() * (r * r).sum())
    if cost.shape[0] < 2 or not float(denom.detach()) > 0:
        return cost.sum() * 0.0
    return 1.0 - (c * r).sum() / denom
