"""Datasets and loaders: digits, generated image folders, augmentation, error messages."""

import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from instaquant.config import DataConfig
from instaquant.data import (
    DataError,
    TensorData,
    TensorLoader,
    build_loaders,
    describe,
    random_crop_flip,
)


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


def _folder_cfg(root, cache, **kw):
    return DataConfig(name="imagefolder", root=str(root), cache_dir=str(cache), **kw)


@pytest.mark.parametrize("native, image_size", [(32, None), (32, 16), (80, None), (80, 48)])
def test_describe_matches_build_loaders_for_image_folders(tmp_path, native, image_size):
    root = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), size=native)
    cfg = _folder_cfg(root, tmp_path / "c", image_size=image_size, batch_size=4)
    _, _, info = build_loaders(cfg, 0, "cpu")
    assert describe(cfg) == info
    expected = image_size or (native if native <= 64 else 224)
    assert info.image_size == expected and info.num_classes == 4


@pytest.mark.parametrize(
    "name, image_size, shape",
    [
        ("digits", None, (10, 1, 8)),
        ("digits", 16, (10, 1, 16)),
        ("cifar10", None, (10, 3, 32)),
        ("cifar100", 24, (100, 3, 24)),
    ],
)
def test_describe_named_datasets_need_no_files(name, image_size, shape):
    info = describe(DataConfig(name=name, root="/nonexistent", image_size=image_size))
    assert (info.num_classes, info.in_channels, info.image_size) == shape


def test_describe_missing_image_folder_is_an_error(tmp_path):
    cfg = _folder_cfg(tmp_path / "missing", tmp_path / "c")
    with pytest.raises(DataError, match=r"data.root '.*missing' does not exist"):
        describe(cfg)
    make_image_folder(tmp_path / "only_val", splits=("val",))
    cfg.root = str(tmp_path / "only_val")
    with pytest.raises(DataError, match=r"image folder '.*train' does not exist"):
        describe(cfg)


def test_describe_absent_image_folder_for_costing(tmp_path):
    cfg = _folder_cfg(tmp_path / "missing", tmp_path / "c")
    cfg.image_size = None
    info = describe(cfg, absent_classes=1000)
    assert (info.num_classes, info.in_channels, info.image_size) == (1000, 3, 224)
    cfg.image_size = 160
    assert describe(cfg, absent_classes=1000).image_size == 160
    make_image_folder(tmp_path / "present")  # a folder that exists is read, not assumed
    cfg.root, cfg.image_size = str(tmp_path / "present"), None
    present = describe(cfg, absent_classes=1000)
    assert present.num_classes == len(present.classes) != 1000


def _is_shifted_window(out, image, pad, fill):
    """``out`` is a ``[C, H, W]`` window of ``image`` padded by ``pad`` with ``fill``."""
    padded = torch.nn.functional.pad(image, (pad,) * 4, value=fill)
    H, W = image.shape[-2:]
    return any(
        torch.equal(out, padded[:, dy : dy + H, dx : dx + W])
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    )


def test_digits_train_and_test_share_a_resized_image_size():
    cfg = DataConfig(name="digits", image_size=16, batch_size=8, eval_batch_size=8, limit=40)
    train, test, info = build_loaders(cfg, seed=0, device="cpu")
    assert info.image_size == 16
    assert next(iter(train))[0].shape == (8, 1, 16, 16)
    assert next(iter(test))[0].shape == (8, 1, 16, 16)
    images = train.data.images[:4]
    resized = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear")
    normed = (resized - train.mean) / train.std
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(test._prepare(images, gen), normed, atol=0, rtol=0)
    # Training crops from the resized image, padded by 16 // 8 = 2 (no flip for digits).
    out = train._prepare(images, gen)
    fill = float((0 - train.mean) / train.std)
    assert all(_is_shifted_window(out[i], normed[i], 2, fill) for i in range(4))


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_image_folder_train_and_test_share_image_size(tmp_path, cache):
    root = make_image_folder(tmp_path / "imgs", size=32)
    cfg = _folder_cfg(root, tmp_path / "c", image_size=16, batch_size=4, eval_batch_size=4)
    cfg.cache, cfg.workers = cache, 0
    train, test, _ = build_loaders(cfg, seed=0, device="cpu")
    assert next(iter(train))[0].shape == next(iter(test))[0].shape == (4, 3, 16, 16)


def test_image_folder_cache_sees_every_file(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    cfg = _folder_cfg(root, tmp_path / "cache", batch_size=4)
    train, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert torch.equal(train.data.labels, torch.tensor([0] * 6 + [1] * 6 + [2] * 6))
    # Move a cat into the dog folder: same count, same first and last file.
    (root / "train" / "cat" / "5.png").rename(root / "train" / "dog" / "moved.png")
    train, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert torch.equal(train.data.labels, torch.tensor([0] * 5 + [1] * 7 + [2] * 6))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    # Rewrite one image in the middle: its new pixels are read, not the cached ones.
    Image.new("RGB", (16, 16), (7, 8, 9)).save(root / "train" / "dog" / "2.png")
    train, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert torch.equal(
        train.data.images[7], torch.tensor([7, 8, 9]).view(3, 1, 1).expand(3, 16, 16)
    )
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


@pytest.mark.parametrize("kw", [{}, {"progress": True}, {"progress": False}])
def test_decode_bars_stay_out_of_redirected_stderr(tmp_path, capsys, kw):
    root = make_image_folder(tmp_path / "imgs")
    cfg = _folder_cfg(root, tmp_path / "cache")
    capsys.readouterr()
    train, _, _ = build_loaders(cfg, seed=0, device="cpu", **kw)
    assert len(train.data) == 18  # the images were decoded, not read from a cache
    assert capsys.readouterr().err == ""


def test_dangling_link_in_a_cached_image_folder_is_skipped(tmp_path):
    make_image_folder(tmp_path / "f")
    (tmp_path / "f" / "train" / "cat" / "00_gone.png").symlink_to(tmp_path / "nowhere.png")
    cfg = _folder_cfg(tmp_path / "f", tmp_path / "c")
    cfg.cache = "yes"
    with pytest.warns(UserWarning, match="skipped 1 unreadable image files"):
        train, _, _ = build_loaders(cfg, 0, "cpu", progress=False)
    assert sum(len(y) for _, y in train) > 0
