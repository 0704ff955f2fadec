"""Small data the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def make_image_folder(
    root: Path, classes=("cat", "dog", "frog"), per_class=6, size=16, splits=("train", "val")
) -> Path:
    """An ImageFolder tree of random PNG images whose mean colour depends on the class."""
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = torch.randint(0, 100, (3, size, size), generator=gen, dtype=torch.uint8)
                img[c % 3] += 120
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root
