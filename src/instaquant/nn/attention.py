"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules, so they quantize.

PyTorch's multi-head attention keeps the query/key/value projection as a raw
parameter and calls its output projection's weight directly, so no ``Linear`` of it
ever runs as a module: a module swap cannot reach them. :func:`split_attention`
replaces each one by :class:`SplitAttention`, the same function written with four
``Linear`` layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) holding the same
weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitAttention(nn.Module):
    """Multi-head attention as in ``nn.MultiheadAttention`` (same arguments and outputs)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        E = mha.embed_dim
        self.embed_dim, self.num_heads = E, mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        bias = mha.in_proj_bias is not None
        factory = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(E, E, bias, **factory) for _ in "qkv")
        self.out_proj = nn.Linear(E, E, mha.out_proj.bias is not None, **factory)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * E : (i + 1) * E])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first or unbatched:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (
            self._heads(proj(t))
            for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        mask = _merge_masks(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, mask, dropout, is_causal=is_causal and mask is None
            )
            weights = None
        B, H, L, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, H * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if weights is not None and unbatched:
            weights = weights.squeeze(0)
        return out, weights

    def _heads(self, t: Tensor) -> Tensor:
        B, L, E = t.shape
        return t.reshape(B, L, self.num_heads, E // self.num_heads).transpose(1, 2)


def _merge_masks(attn_mask: Tensor | None, padding: Tensor | None, q: Tensor) -> Tensor | None:
    """One additive float mask ``[B or 1, H or 1, L, S]`` from PyTorch's two mask arguments."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(
                m, float("-inf")
            )
        return m.to(q.dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # [B * H, L, S]
            mask = mask.reshape(q.shape[0], q.shape[1], *mask.shape[1:])
    if padding is not None:
        pad = additive(padding)[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
        mask = pad if mask is None else mask + pad
    return mask


def supported(mha: nn.MultiheadAttention) -> bool:
    """Whether :class:`SplitAttention` computes what ``mha`` computes."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


def split_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every supported ``nn.MultiheadAttention`` of ``model`` by a
    :class:`SplitAttention` with the same weights; the names of those replaced."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and supported(m)
    ]
    for name, mha in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitAttention(mha))
    return [name for name, _ in found]
