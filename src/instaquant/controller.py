"""The bit controller: tap features to per-layer candidate logits, and the selection rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BitController(nn.Module):
    """``pool → flatten → standardize → Linear → ReLU → Dropout → Linear``: logits ``[B, L, K]``.

    With ``separate=True`` weights and activations get their own choice: ``[B, L, 2, K]``
    (index 0 weights, 1 activations). Adaptive pooling makes it independent of the
    input resolution.

    Input features of a ``[B, C, H, W]`` tap: the average over a ``grid × grid`` layout of
    cells (``grid=1``: global pooling, C features; the official code pools ImageNet's layer1
    to 8x8), and with ``stats`` two per-channel statistics that pooling averages away: the
    standard deviation over positions and the gradient energy (mean absolute difference of
    neighbouring positions, a measure of fine detail). ``in_channels`` is C.

    Input features of a ``[B, N, C]`` tap (``tokens=True``, transformers): the first token
    (the class token of a ViT) and the mean of the others (the patch tokens), 2C features.

    ``normalize`` standardizes the pooled features (batch norm without affine, running
    statistics in evaluation). Pooled features of different images share a large
    common part; without it the per-image differences are tiny next to the
    logits' bias, and the controller tends to give every image the same bits.
    """

    def __init__(
        self,
        in_channels: int,
        num_layers: int,
        num_candidates: int,
        hidden: int = 128,
        dropout: float = 0.1,
        separate: bool = False,
        normalize: bool = True,
        grid: int = 1,
        stats: bool = False,
        tokens: bool = False,
    ) -> None:
        super().__init__()
        if tokens and (grid != 1 or stats):
            raise ValueError(
                "controller_grid and controller_stats read feature maps [B, C, H, W]; a "
                "token tap [B, N, C] gives the class token and the mean patch token"
            )
        self.num_layers = num_layers
        self.num_candidates = num_candidates
        self.separate = separate
        self.stats = stats
        self.tokens = tokens
        self.pool = nn.AdaptiveAvgPool2d(grid)
        in_features = in_channels * grid * grid + (2 * in_channels if stats else 0)
        if tokens:
            in_features = 2 * in_channels
        self.norm = nn.BatchNorm1d(in_features, affine=False) if normalize else None
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        outputs = num_layers * (2 if separate else 1) * num_candidates
        self.fc2 = nn.Linear(hidden, outputs)
        # Start close to uniform: every candidate is explored before the budget shapes it.
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    @property
    def ops_per_input_element(self) -> int:
        """Adds per tap element for the pooling (1) and the statistics (2 each, as counted
        in the controller's MACs)."""
        return 1 + (4 if self.stats else 0)

    def features(self, tap: Tensor) -> Tensor:
        """The flat input features ``[B, F]`` of a tap output."""
        if self.tokens:
            return torch.cat([tap[:, 0], tap[:, 1:].mean(dim=1)], dim=1)
        if tap.dim() != 4:
            return torch.flatten(tap, 1)
        pooled = torch.flatten(self.pool(tap), 1)
        if not self.stats:
            return pooled
        std = tap.flatten(2).std(dim=2, correction=0)
        dx = (tap[..., :, 1:] - tap[..., :, :-1]).abs().mean(dim=(2, 3))
        dy = (tap[..., 1:, :] - tap[..., :-1, :]).abs().mean(dim=(2, 3))
        return torch.cat([pooled, std, dx + dy], 1)

    def forward(self, features: Tensor) -> Tensor:
        h = self.features(features)
        if self.norm is not None:
            # A single image has no batch statistics: use the running ones.
            use_batch = self.training and h.shape[0] > 1
            h = F.batch_norm(
                h,
                self.norm.running_mean,
                self.norm.running_var,
                training=use_batch,
                momentum=self.norm.momentum,
                eps=self.norm.eps,
            )
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
