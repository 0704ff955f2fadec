"""The bit controller: tap features to per-layer candidate logits, and the selection rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BitController(nn.Module):
    """``pool → flatten → Linear → ReLU → Dropout → Linear`` giving logits ``[B, L, K]``.

    With ``separate=True`` weights and activations get their own choice: ``[B, L, 2, K]``
    (index 0 weights, 1 activations). Adaptive pooling makes it independent of the
    input resolution.
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        num_candidates: int,
        hidden: int = 128,
        dropout: float = 0.1,
        separate: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_candidates = num_candidates
        self.separate = separate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        outputs = num_layers * (2 if separate else 1) * num_candidates
        self.fc2 = nn.Linear(hidden, outputs)
        # Start close to uniform: every candidate is explored before the budget shapes it.
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            features = self.pool(features)
        h = torch.flatten(features, 1)
        h = self.dropout(F.relu(self.fc1(h)))
        per_layer = (2, self.num_candidates) if self.separate else (self.num_candidates,)
        return self.fc2(h).reshape(h.shape[0], self.num_layers, *per_layer)


def select(logits: Tensor, tau: float, training: bool, sample_in_eval: bool = False) -> Tensor:
    """One-hot choice over the last dimension.

    Training (or ``sample_in_eval``): hard Gumbel-Softmax, straight-through to the soft
    sample. The temperature divides the logits before the Gumbel noise is added, so
    the sampled choices follow ``softmax(logits / tau)``: annealing ``tau`` towards 0
    makes training choose what the deterministic argmax of evaluation chooses (with
    the usual form, ``softmax((logits + g) / tau)``, the hard samples ignore ``tau``).
    At ``tau = 1`` both forms are the same. Evaluation: argmax, deterministic.
    """
    if training or sample_in_eval:
        return F.gumbel_softmax(logits / tau, tau=1.0, hard=True, dim=-1)
    index = logits.argmax(dim=-1)
    return F.one_hot(index, logits.shape[-1]).to(logits.dtype)


def annealed_tau(start: float, end: float, progress: float) -> float:
    """Exponential annealing from ``start`` to ``end`` as ``progress`` goes 0 → 1."""
    progress = min(max(progress, 0.0), 1.0)
    return float(start * (end / start) ** progress)
