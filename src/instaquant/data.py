"""Datasets: digits (embedded), cifar10/cifar100 (torchvision), imagefolder (ImageNet layout).

Small datasets are decoded once and kept as one uint8 (or float) tensor; batches
are augmented on tensors (padded random crop + flip, or random resized crop), so
no JPEG is decoded twice. Large image folders are streamed through a DataLoader.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DataConfig, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Image folders with at most this many pixels per image are cached as tensors by default.
SMALL_IMAGE_PIXELS = 64 * 64


class DataError(UserError):
    pass


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]


@dataclass
class TensorData:
    """Decoded images ``[N, C, H, W]`` (uint8 0..255 or float 0..1) and labels ``[N]``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, limit: int | None, seed: int = 0) -> TensorData:
        if limit is None or limit >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit]
        idx = idx.sort().values
        return TensorData(self.images[idx], self.labels[idx])


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Per-sample padded random crop (zero padding) and horizontal flip of a batch."""
    B, _, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (oy[:, None] + torch.arange(H)).view(B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(W)).view(B, 1, 1, W)
        batch = torch.arange(B).view(B, 1, 1, 1)
        chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
        x = xp[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(B, generator=gen) < 0.5
        x = torch.where(mask.view(B, 1, 1, 1), x.flip(-1), x)
    return x


def random_resized_crop_flip(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """RandomResizedCrop (scale 0.08..1, ratio 3/4..4/3) and flip, per sample, on tensors."""
    B, C, H, W = x.shape
    out = x.new_empty((B, C, size, size), dtype=torch.float32)
    for i in range(B):
        h, w = H, W
        for _ in range(10):
            area = H * W * float(torch.empty(1).uniform_(0.08, 1.0, generator=gen))
            logr = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
            ratio = float(torch.exp(logr))
            w_try, h_try = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w_try <= W and 0 < h_try <= H:
                h, w = h_try, w_try
                break
        top = int(torch.randint(0, H - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, W - w + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, top : top + h, left : left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


# --------------------------------------------------------------------------- loaders


# Added to a seed per rank, so that ranks draw different noise (rank 0 keeps the
# single-process seed): far above any epoch count, so no two (epoch, rank) pairs collide.
RANK_STRIDE = 1_000_000_007


class TensorLoader:
    """Batches of an in-memory dataset, augmented and normalized on the fly.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees
    exactly the batches an uninterrupted one would. ``rank``/``world`` shard it for DDP.
    """

    def __init__(
        self,
        data: TensorData,
        info: DatasetInfo,
        batch_size: int,
        train: bool,
        augment: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.data, self.info = data, info
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.seed, self.device, self.rank, self.world = seed, torch.device(device), rank, world
        self.epoch = 0
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.data)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
            usable = (n // self.world) * self.world  # equal shards: DDP steps stay in lockstep
            return order[:usable][self.rank :: self.world]
        return torch.arange(n)[self.rank :: self.world]

    def __len__(self) -> int:
        n = len(self._indices())
        return (
            n // self.batch_size
            if self.train and n >= self.batch_size
            else math.ceil(n / self.batch_size)
        )

    def _prepare(self, images: Tensor, gen: torch.Generator) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.info.image_size
        if self.augment and size > 64:
            x = random_resized_crop_flip(x, size, gen)  # crops from the stored images, then resizes
        else:
            # Train and test see the same resolution: resize first, then the small-image crop.
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            if self.augment:
                flip = not self.info.name.startswith("digits")  # a mirrored digit is another symbol
                x = random_crop_flip(x, max(1, size // 8), flip, gen)
        return (x - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices()
        # Augmentation draws its own stream per rank (rank 0: the single-process stream).
        seed = self.seed * 100_003 + self.epoch + 7 + RANK_STRIDE * self.rank
        gen = torch.Generator().manual_seed(seed)
        drop_last = self.train and len(idx) >= self.batch_size
        stop = len(idx) - (len(idx) % self.batch_size if drop_last else 0)
        for start in range(0, stop, self.batch_size):
            b = idx[start : start + self.batch_size]
            x = self._prepare(self.data.images[b], gen)
            yield x.to(self.device), self.data.labels[b].to(self.device)


class StreamLoader:
    """A large image folder read through torchvision's ImageFolder and a DataLoader."""

    def __init__(self, root: Path, info: DatasetInfo, cfg: DataConfig, train: bool, seed: int,
                 device: torch.device | str, rank: int = 0, world: int = 1) -> None:  # fmt: skip
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        size = info.image_size
        norm = T.Normalize(info.mean, info.std)
        if train and cfg.augment:
            tf = T.Compose(
                [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
            )
        else:
            tf = T.Compose(
                [T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm]
            )
        self.dataset = ImageFolder(str(root), transform=tf)
        if cfg.limit is not None and cfg.limit < len(self.dataset):
            gen = torch.Generator().manual_seed(0)
            keep = torch.randperm(len(self.dataset), generator=gen)[: cfg.limit].sort().values
            self.dataset = torch.utils.data.Subset(self.dataset, keep.tolist())
        self.sampler: torch.utils.data.distributed.DistributedSampler | None = None
        if train:
            self.sampler = torch.utils.data.distributed.DistributedSampler(
                self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed
            )
        elif world > 1:
            # Each test image on exactly one rank, as TensorLoader shards: DistributedSampler
            # would pad the last shards with repeated images, which evaluation would count.
            shard = range(rank, len(self.dataset), world)
            self.dataset = torch.utils.data.Subset(self.dataset, list(shard))
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            sampler=self.sampler,
            num_workers=min(cfg.workers, os.cpu_count() or 1),
            drop_last=train,
            pin_memory=torch.device(device).type == "cuda",
        )
        self.device = torch.device(device)
        self.info = info

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# --------------------------------------------------------------------------- sources


def load_digits() -> tuple[TensorData, TensorData, DatasetInfo]:
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    train = TensorData(images[train_idx], labels[train_idx])
    test = TensorData(images[test_idx], labels[test_idx])
    mean = float(train.images.mean())
    std = float(train.images.std())
    info = DatasetInfo("digits", 10, 1, 8, (mean,), (std,), [str(i) for i in range(10)])
    return train, test, info


# Noise strength (standard deviation, images in 0..1) of each copy of a digit in
# ``digits_noise``: the noisier, the closer to the decision boundary.
DIGITS_NOISE = (0.0, 0.2, 0.4, 0.6)
# Contrast (a factor on the pixel values) of each copy of a digit in ``digits_contrast``: the
# fainter, the finer the activation steps that keep its strokes apart.
DIGITS_CONTRAST = (1.0, 0.3, 0.1, 0.03)
# Weight of the labelled digit in each copy of ``digits_blend`` (the rest is a digit of another
# class): the closer to one half, the smaller the margin that quantization noise can flip.
DIGITS_BLEND = (1.0, 0.8, 0.7, 0.6)
# Brightness of the other-class digit laid over the labelled one in ``digits_overlay``,
# relative to the labelled digit: the brighter, the finer the steps that keep the fainter
# labelled strokes apart from the cover.
DIGITS_OVERLAY = (0.0, 2.0, 3.0, 4.0)
# The two halves of ``digits_mixed``: 0 for the bars that name a class (right at any
# precision), 1 for the digits under a cover of brightness 4 (they need fine activation steps).
DIGITS_MIXED = (0.0, 1.0)

# Makes one copy of a split's images at a level: (images, level, generator, partners), where
# partners holds, for each image, one of another class (None unless asked for).
Alter = Callable[[Tensor, float, torch.Generator, "Tensor | None"], Tensor]


def _of_another_class(labels: Tensor, gen: torch.Generator) -> Tensor:
    """For each image, the index of a randomly drawn image of another class."""
    partner = torch.randint(0, len(labels), (len(labels),), generator=gen)
    while bool((same := labels[partner] == labels).any()):
        partner[same] = torch.randint(0, len(labels), (int(same.sum()),), generator=gen)
    return partner


def _at_every_level(
    name: str, levels: tuple[float, ...], alter: Alter, partners: bool = False
) -> tuple[TensorData, TensorData, DatasetInfo]:
    """The digits once per level, ``alter(images, level, generator, partners)`` making each
    copy; train and test alike, the test split ordered by level (see
    :func:`level_of_test_images`). With ``partners``, each image is paired once per split with
    an image of another class of the same split."""
    train, test, info = load_digits()
    gen = torch.Generator().manual_seed(2024)

    def every_level(data: TensorData) -> TensorData:
        other = data.images[_of_another_class(data.labels, gen)] if partners else None
        copies = [alter(data.images, level, gen, other) for level in levels]
        return TensorData(torch.cat(copies), data.labels.repeat(len(levels)))

    train, test = every_level(train), every_level(test)
    mean, std = float(train.images.mean()), float(train.images.std())
    return train, test, DatasetInfo(name, 10, 1, 8, (mean,), (std,), info.classes)


def load_digits_noise() -> tuple[TensorData, TensorData, DatasetInfo]:
    """The digits at four noise strengths (:data:`DIGITS_NOISE`), a task of known difficulty.

    Every image appears once at each strength, in train and test alike, with Gaussian noise
    drawn once from a fixed seed; the test split is ordered by strength (the first quarter
    clean, the last the noisiest), so test image ``i`` has strength
    ``DIGITS_NOISE[i * 4 // N]`` (see :func:`noise_of_test_images`).
    """
    return _at_every_level(
        "digits_noise",
        DIGITS_NOISE,
        lambda images, s, gen, _: images + s * torch.randn(images.shape, generator=gen),
    )


def load_digits_contrast() -> tuple[TensorData, TensorData, DatasetInfo]:
    """The digits at four contrasts (:data:`DIGITS_CONTRAST`), a task whose difficulty for a
    quantized network is known by construction.

    Every image appears once at each contrast (its pixel values times the factor), in train
    and test alike, the test split ordered from the full-contrast quarter to the faintest. At
    full precision every contrast is as easy as the next; quantized, a faint image's features
    span fewer of the activation steps that the bright ones set, so it needs more bits.
    """
    return _at_every_level("digits_contrast", DIGITS_CONTRAST, lambda images, c, gen, _: c * images)


def load_digits_blend() -> tuple[TensorData, TensorData, DatasetInfo]:
    """Each digit blended with a digit of another class at four weights (:data:`DIGITS_BLEND`):
    ``w * digit + (1 - w) * other``, labelled as the digit; the partner is drawn once per image
    and split, the test split ordered from the unblended quarter to ``w = 0.6``."""
    return _at_every_level(
        "digits_blend",
        DIGITS_BLEND,
        lambda images, w, gen, other: w * images + (1 - w) * other,
        partners=True,
    )


def load_digits_overlay() -> tuple[TensorData, TensorData, DatasetInfo]:
    """Each digit under a brighter digit of another class (:data:`DIGITS_OVERLAY`):
    ``(digit + k * other) / (1 + k)``, labelled as the fainter digit; the partner is drawn once
    per image and split, the test split ordered from the uncovered quarter to ``k = 4``."""
    return _at_every_level(
        "digits_overlay",
        DIGITS_OVERLAY,
        lambda images, k, gen, other: (images + k * other) / (1 + k),
        partners=True,
    )


def class_bars(labels: Tensor) -> Tensor:
    """8x8 images of two parallel bars whose direction (vertical for classes 0-4, horizontal for
    5-9) and distance (1 to 5 pixels) name the class: a shift by one pixel, as the training
    crop makes, keeps both bars and their distance."""
    images = torch.zeros(len(labels), 1, 8, 8)
    for i, label in enumerate(labels.tolist()):
        apart = 1 + label % 5
        if label < 5:
            images[i, 0, 1:7, [1, 1 + apart]] = 1.0
        else:
            images[i, 0, [1, 1 + apart], 1:7] = 1.0
    return images


def load_digits_mixed() -> tuple[TensorData, TensorData, DatasetInfo]:
    """Two kinds of image, one per half (:data:`DIGITS_MIXED`): each digit's label drawn as
    :func:`class_bars`, easy at any precision, and the digit under a brighter digit of another
    class (``(digit + 4 * other) / 5``, the hardest level of ``digits_overlay``), hard at any
    precision and harder the coarser the activation steps. Train and test alike; the test split
    ordered bars first. A task where bits must go to some images and not others."""
    train, test, info = load_digits()
    gen = torch.Generator().manual_seed(2024)

    def both_kinds(data: TensorData) -> TensorData:
        other = data.images[_of_another_class(data.labels, gen)]
        covered = (data.images + 4 * other) / 5
        images = torch.cat([class_bars(data.labels), covered])
        return TensorData(images, data.labels.repeat(len(DIGITS_MIXED)))

    train, test = both_kinds(train), both_kinds(test)
    mean, std = float(train.images.mean()), float(train.images.std())
    return train, test, DatasetInfo("digits_mixed", 10, 1, 8, (mean,), (std,), info.classes)


# The known level of each test image of the datasets built by :func:`_at_every_level`, and
# the kind of each of ``digits_mixed``.
LEVELED_DATASETS = {
    "digits_noise": DIGITS_NOISE,
    "digits_contrast": DIGITS_CONTRAST,
    "digits_blend": DIGITS_BLEND,
    "digits_overlay": DIGITS_OVERLAY,
    "digits_mixed": DIGITS_MIXED,
}


def level_of_test_images(name: str, n: int) -> Tensor:
    """The known level (noise strength, contrast, blend weight, cover brightness or kind) of each of
    the ``n`` test images of a dataset of :data:`LEVELED_DATASETS` (loader order, without
    ``data.limit``)."""
    levels = torch.tensor(LEVELED_DATASETS[name], dtype=torch.float64)
    return levels.repeat_interleave(n // len(levels))


def noise_of_test_images(n: int) -> Tensor:
    """The noise strength of each of the ``n`` test images of ``digits_noise`` (loader order,
    without ``data.limit``)."""
    return level_of_test_images("digits_noise", n)


def load_cifar(name: str, root: str, download: bool) -> tuple[TensorData, TensorData, DatasetInfo]:
    """CIFAR-10/100 through torchvision (the python pickles), kept as uint8 tensors."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    try:
        splits = [cls(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as err:
        raise DataError(
            f"{label} not found under {root!r} ({err}); run with data.download=true "
            f"(needs internet once) or set data.root to the folder holding it"
        ) from None
    except OSError as err:
        raise DataError(
            f"{label} could not be downloaded to {root!r} ({type(err).__name__}); "
            "download it on a machine with internet and copy it there"
        ) from None
    parts = []
    for ds in splits:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        parts.append(TensorData(images, torch.tensor(ds.targets, dtype=torch.long)))
    classes = list(splits[0].classes)
    info = DatasetInfo(name, len(classes), 3, 32, CIFAR_MEAN, CIFAR_STD, classes)
    return parts[0], parts[1], info


def _class_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {str(folder)!r} has no class sub-folders (expected <class>/<image>)"
        )
    return classes


def _walk(folder: Path, classes: list[str]) -> Iterator[tuple[str, int]]:
    """Every file under the class folders as (path, label), in a fixed order."""
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / cls)):
            for f in sorted(files):
                yield os.path.join(dirpath, f), label


def _no_images(folder: Path) -> DataError:
    return DataError(
        f"image folder {str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
    )


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, int]], int]:
    """Class names, (path, label) pairs and the number of non-image files skipped."""
    classes = _class_names(folder)
    items, skipped = [], 0
    for path, label in _walk(folder, classes):
        name = os.path.basename(path)
        if name.lower().endswith(IMAGE_EXTENSIONS):
            items.append((path, label))
        elif not name.startswith("."):
            skipped += 1
    if not items:
        raise _no_images(folder)
    return classes, items, skipped


def _decode(path: str, size: int) -> Tensor:
    """One image as uint8 ``[3, size, size]``: shorter side resized to ``size``, centre crop."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize(
                (max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR
            )
            left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _decode_all(
    items: list[tuple[str, int]], size: int, desc: str, progress: bool
) -> tuple[TensorData, int]:
    """Decode and resize every image once; unreadable files are skipped and counted."""
    from PIL import UnidentifiedImageError
    from tqdm import tqdm

    images = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    labels = torch.empty(len(items), dtype=torch.long)
    n, bad = 0, 0
    # disable=None: no bar when stderr is not a terminal (logs), as the training bars.
    disable = None if progress else True
    bar = tqdm(items, desc=desc, unit="img", leave=False, mininterval=1.0, disable=disable)
    for path, label in bar:
        try:
            images[n] = _decode(path, size)
        except (OSError, UnidentifiedImageError, ValueError):
            bad += 1
            continue
        labels[n] = label
        n += 1
    return TensorData(images[:n].clone(), labels[:n].clone()), bad


def _cache_path(cfg: DataConfig, split: Path, size: int, items: list[tuple[str, int]]) -> Path:
    """Cache file named by a hash of every file's relative path, label, size and mtime.

    Any added, removed, moved, relabelled or rewritten image gives a new name, so a stale
    cache is never read (one stat per file).
    """
    root = Path(cfg.cache_dir or Path.home() / ".cache" / "instaquant")
    digest = hashlib.sha1(f"{split.resolve()}|{size}".encode())
    for path, label in items:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:  # a dangling link, a file gone since the scan: the decode skips it
            stamp = "missing"
        rel = os.path.relpath(path, split)
        digest.update(f"\n{rel}|{label}|{stamp}".encode())
    return root / f"imagefolder-{digest.hexdigest()[:16]}.pt"


def _load_split(
    cfg: DataConfig, split: Path, size: int, seed: int, progress: bool
) -> tuple[TensorData, list[str]]:
    from .checkpoint import atomic_save

    classes, items, skipped = _scan(split)
    if cfg.limit is not None and cfg.limit < len(items):
        keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[
            : cfg.limit
        ]
        items = [items[i] for i in keep.sort().values.tolist()]
    if skipped:
        warnings.warn(f"{split}: skipped {skipped} non-image files", stacklevel=2)
    cache = _cache_path(cfg, split, size, items)
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return TensorData(blob["images"], blob["labels"]), classes
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    data, bad = _decode_all(items, size, f"decoding {split.name}", progress)
    if bad:
        warnings.warn(f"{split}: skipped {bad} unreadable image files", stacklevel=2)
    if len(data) == 0:
        raise DataError(f"image folder {str(split)!r}: no image could be decoded")
    try:
        atomic_save({"images": data.images, "labels": data.labels}, cache)
    except OSError:
        pass  # caching is an optimisation; a read-only home is fine
    return data, classes


def image_folder_splits(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} does not exist (an image folder needs train/ and val/ "
            "or test/ sub-folders)"
        )
    train = root / "train"
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"image folder {str(root)!r} needs train/ and val/ (or test/) sub-folders")


def _native_size(folder: Path) -> int:
    """Default image size of a folder: its first image's shorter side when small, else 224.

    Only that image's header is read, and only the folders up to it are walked.
    """
    from PIL import Image, UnidentifiedImageError

    walk = _walk(folder, _class_names(folder))
    path = next((p for p, _ in walk if p.lower().endswith(IMAGE_EXTENSIONS)), None)
    if path is None:
        raise _no_images(folder)
    try:
        with Image.open(path) as img:
            side = min(img.size)
    except (OSError, UnidentifiedImageError, ValueError):
        raise DataError(
            f"cannot read {path!r} to find the image size of {str(folder)!r}; "
            "set data.image_size or remove the file"
        ) from None
    return side if side * side <= SMALL_IMAGE_PIXELS else 224


def _should_cache(cfg: DataConfig, size: int) -> bool:
    if cfg.cache == "auto":
        return size * size <= SMALL_IMAGE_PIXELS
    return cfg.cache == "yes"


def _folder_info(cfg: DataConfig, classes: list[str], size: int) -> DatasetInfo:
    """The info of an image folder, shared by build_loaders and describe so they agree."""
    small = _should_cache(cfg, size) and size <= 32  # decoded CIFAR-sized images
    mean, std = (CIFAR_MEAN, CIFAR_STD) if small else (IMAGENET_MEAN, IMAGENET_STD)
    return DatasetInfo("imagefolder", len(classes), 3, size, mean, std, classes)


def build_loaders(
    cfg: DataConfig,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> tuple[TensorLoader | StreamLoader, TensorLoader | StreamLoader, DatasetInfo]:
    """Train and test loaders for ``cfg`` (``rank``/``world`` shard them for DDP).

    ``progress=False`` hides the bars of a first image-folder decode; with ``True`` they
    show only when stderr is a terminal.
    """
    kw = dict(seed=seed, device=device, rank=rank, world=world)
    if cfg.name == "imagefolder":
        root = Path(cfg.root)
        train_dir, test_dir = image_folder_splits(root)
        size = cfg.image_size or _native_size(train_dir)
        if not _should_cache(cfg, size):
            classes, _, _ = _scan(train_dir)
            test_classes, _, _ = _scan(test_dir)
            _check_same_classes(classes, test_classes, train_dir, test_dir)
            info = _folder_info(cfg, classes, size)
            return (
                StreamLoader(train_dir, info, cfg, True, **kw),
                StreamLoader(test_dir, info, cfg, False, **kw),
                info,
            )
        train, classes = _load_split(cfg, train_dir, size, 0, progress)
        test, test_classes = _load_split(cfg, test_dir, size, 1, progress)
        _check_same_classes(classes, test_classes, train_dir, test_dir)
        info = _folder_info(cfg, classes, size)
    else:
        if cfg.name == "digits":
            train, test, info = load_digits()
        elif cfg.name == "digits_noise":
            train, test, info = load_digits_noise()
        elif cfg.name == "digits_contrast":
            train, test, info = load_digits_contrast()
        elif cfg.name == "digits_blend":
            train, test, info = load_digits_blend()
        elif cfg.name == "digits_overlay":
            train, test, info = load_digits_overlay()
        elif cfg.name == "digits_mixed":
            train, test, info = load_digits_mixed()
        else:
            train, test, info = load_cifar(cfg.name, cfg.root, cfg.download)
        train, test = train.subset(cfg.limit, seed=0), test.subset(cfg.limit, seed=1)
        if cfg.image_size and cfg.image_size != info.image_size:
            info.image_size = cfg.image_size
    for split, data in (("train", train), ("test", test)):
        if data.images.is_floating_point() and not torch.isfinite(data.images).all():
            raise DataError(f"the {split} images of {cfg.name!r} hold NaN or inf values")
    return (
        TensorLoader(train, info, cfg.batch_size, True, cfg.augment, **kw),
        TensorLoader(test, info, cfg.eval_batch_size, False, **kw),
        info,
    )


def _check_same_classes(a: list[str], b: list[str], da: Path, db: Path) -> None:
    if a != b:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DataError(
            f"class folders differ between {str(da)!r} and {str(db)!r}: only in train "
            f"{only_a[:5]}, only in test {only_b[:5]}"
        )


def describe(cfg: DataConfig, absent_classes: int | None = None) -> DatasetInfo:
    """The dataset's shape (classes, channels, size) as build_loaders gives it, cheaply.

    Named datasets need no file; an image folder's class folders are listed and, without
    ``data.image_size``, one image header is read for the native size. With
    ``absent_classes``, a missing ``data.root`` is taken as that many classes at
    ``data.image_size`` (224 when unset) instead of an error: costing a model needs no data.
    """
    if cfg.name == "imagefolder" and absent_classes is not None and not Path(cfg.root).exists():
        size = cfg.image_size or 224
        return DatasetInfo("imagefolder", absent_classes, 3, size, IMAGENET_MEAN, IMAGENET_STD, [])
    if cfg.name == "imagefolder":
        train_dir, _ = image_folder_splits(Path(cfg.root))
        classes = _class_names(train_dir)
        return _folder_info(cfg, classes, cfg.image_size or _native_size(train_dir))
    if cfg.name in ("digits", *LEVELED_DATASETS):
        info = DatasetInfo(cfg.name, 10, 1, 8, (0.0,), (1.0,), [])
    else:
        classes = 10 if cfg.name == "cifar10" else 100
        info = DatasetInfo(cfg.name, classes, 3, 32, CIFAR_MEAN, CIFAR_STD, [])
    if cfg.image_size:
        info.image_size = cfg.image_size
    return info
