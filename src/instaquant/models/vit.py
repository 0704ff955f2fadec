"""A small Vision Transformer for 32x32 images: 4x4 patches, class token, pre-norm blocks.

Every projection is an ``nn.Linear`` (attention ``qkv`` and ``proj``, MLP ``fc1`` and
``fc2``), so each can be quantized and made dynamic; the attention products run in
``scaled_dot_product_attention`` and are listed as full-precision MACs (quantized, and
counted in BitOPs, with ``product_bits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import tag


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not a multiple of the heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``patch_embed`` (a strided conv) → class token + position embedding → ``blocks`` →
    ``norm`` → ``head`` on the class token."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(
                f"input gives {x.shape[1] - 1} patches but the position embedding holds "
                f"{self.pos_embed.shape[1] - 1}; build the model for this image size"
            )
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


def vit_cifar(num_classes: int = 10, in_channels: int = 3) -> VisionTransformer:
    """ViT for 32x32 images: patch 4 (64 patches + class token), width 128, 6 blocks of 4
    heads, MLP 256 (about 0.8M parameters, 55M MACs per image)."""
    return tag(VisionTransformer(num_classes, in_channels), "vit_cifar", num_classes, in_channels)
