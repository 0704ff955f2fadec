"""Datasets and loaders: digits, generated image folders, augmentation, error messages."""

import pytest
import torch

from helpers import make_image_folder
from instaquant.config import DataConfig
from instaquant.data import DataError, TensorData, TensorLoader, build_loaders, random_crop_flip


def test_digits_loader_shapes_and_determinism():
    cfg = DataConfig(name="digits", batch_size=32, eval_batch_size=100, limit=200)
    train, test, info = build_loaders(cfg, seed=0, device="cpu")
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == 8
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert len(train) == 200 // 32 and len(test) == 2
    train.set_epoch(3)
    a = [b[1] for b in train]
    train.set_epoch(3)
    b = [b[1] for b in train]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    train.set_epoch(4)
    assert not torch.equal(a[0], next(iter(train))[1])


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_crop_flip(x, 0, False, gen), x, atol=0, rtol=0)
    out = random_crop_flip(x, 2, False, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(
            torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
            for dy in range(5)
            for dx in range(5)
        )
        assert found


def test_image_folder_decoded_once_and_cached(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = DataConfig(
        name="imagefolder",
        root=str(root),
        image_size=16,
        batch_size=4,
        eval_batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(UserWarning, match="skipped 1 non-image files"):
        train, test, info = build_loaders(cfg, seed=0, device="cpu")
    assert info.classes == ["cat", "dog", "frog"] and info.num_classes == 3
    assert len(train.data) == 18 and len(test.data) == 18
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    x, y = next(iter(test))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    # Labels follow the folders: the class colour channel is the brightest.
    raw = test.data.images.float().mean(dim=(2, 3))
    assert torch.equal(raw.argmax(1), test.data.labels)
    with pytest.warns(UserWarning):
        again, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert torch.equal(again.data.images, train.data.images)


def test_image_folder_limit_resizes_and_keeps_classes(tmp_path):
    root = make_image_folder(tmp_path / "imgs", size=20)
    cfg = DataConfig(
        name="imagefolder", root=str(root), image_size=8, limit=9, cache_dir=str(tmp_path / "c")
    )
    train, test, _ = build_loaders(cfg, seed=0, device="cpu")
    assert len(train.data) == 9 and train.data.images.shape[-2:] == (8, 8)
    assert len(set(train.data.labels.tolist())) > 1


def test_image_folder_errors(tmp_path):
    cfg = DataConfig(
        name="imagefolder", root=str(tmp_path / "missing"), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataError, match="needs train/ and val/"):
        build_loaders(cfg, 0, "cpu")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    cfg.root = str(empty)
    with pytest.raises(DataError, match="has no class sub-folders"):
        build_loaders(cfg, 0, "cpu")
    odd = make_image_folder(tmp_path / "odd", splits=("train",))
    make_image_folder(odd, classes=("cat", "dog", "bird"), splits=("val",))
    cfg.root, cfg.image_size = str(odd), 16
    with pytest.raises(DataError, match="class folders differ"):
        build_loaders(cfg, 0, "cpu")


def test_cifar_offline_message(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(DataError, match="data.download=true"):
        build_loaders(cfg, 0, "cpu")


def test_sharded_loader_splits_evenly():
    data = TensorData(torch.zeros(10, 1, 4, 4), torch.arange(10))
    from instaquant.data import DatasetInfo

    info = DatasetInfo("t", 10, 1, 4, (0.0,), (1.0,), [])
    shards = [
        TensorLoader(data, info, 2, train=True, augment=False, rank=r, world=2) for r in (0, 1)
    ]
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 4
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
