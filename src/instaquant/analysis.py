"""Per-sample analysis of a quantized run: what the bit controller chose for each test image.

:func:`analyze` evaluates a run's checkpoint on its test set and keeps, per image, the
label, prediction, loss, confidence, predictive entropy, BitOPs and the bits chosen in
every layer; with a full-precision run it also evaluates that model on the very same
test batches, so the FP loss can serve as an independent measure of difficulty.
The statistics here (ranks, Spearman correlation, candidate usage, accuracy by BitOPs
quantile) are plain functions of those tensors.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config, UserError
from .convert import DynamicQuantModel, QuantModel
from .cost import BITOPS_CONVENTION, reference_label
from .headroom import Headroom, measure_headroom
from .stats import rankdata, spearman

CHECKPOINTS = ("last", "best")


@dataclass
class Analysis:
    """Per-sample records of one quantized run on its test set (index order of the loader)."""

    name: str
    recipe: str  # "static" or "dynamic"
    model_name: str
    dataset: str
    checkpoint: str
    classes: list[str]
    layer_names: list[str]  # the layers whose bits vary per sample (static runs: all quantized)
    layer_macs: list[int]
    candidates: tuple[int, ...]
    separate: bool
    ref_bits: int
    ref_bitops: float
    label: Tensor
    pred: Tensor
    loss: Tensor
    confidence: Tensor  # max softmax probability
    entropy: Tensor  # of the softmax, in nats
    bitops: Tensor  # float64
    bits_w: Tensor  # [N, L]
    bits_a: Tensor  # [N, L]
    metrics: dict[str, Any]
    layers: list[Any] = field(default_factory=list, repr=False)  # cost.LayerInfo of every layer
    method: str | None = None  # the quantizer method (pact, lsq, ...)
    weight_bits: int | None = None  # weights fixed at these bits; candidates are activations'
    data_root: str | None = None  # the image folder read (resolved); None for named datasets
    fp_run: str | None = None
    fp_loss: Tensor | None = None
    fp_confidence: Tensor | None = None
    fp_pred: Tensor | None = None
    budget_rel: float | None = None  # the training target relative to the reference
    headroom: Headroom | None = None  # DQ runs: every uniform candidate and the oracles
    test_loader: Any = field(default=None, repr=False)
    convention: str = BITOPS_CONVENTION

    @property
    def n(self) -> int:
        return int(self.label.shape[0])

    @property
    def reference_name(self) -> str:
        """The static model relative BitOPs count against (:func:`cost.reference_label`)."""
        return reference_label(self.ref_bits, self.weight_bits)

    @property
    def index(self) -> Tensor:
        return torch.arange(self.n)

    @property
    def correct(self) -> Tensor:
        return self.pred == self.label

    @property
    def bitops_rel(self) -> Tensor:
        return self.bitops / self.ref_bitops

    @property
    def difficulty_name(self) -> str:
        return "full-precision loss" if self.fp_loss is not None else "predictive entropy"

    @property
    def difficulty(self) -> Tensor:
        """FP loss when an FP run was given (independent of the DQ model), else DQ's own entropy."""
        return self.fp_loss if self.fp_loss is not None else self.entropy

    @property
    def bitops_constant(self) -> bool:
        return bool((self.bitops == self.bitops[0]).all())

    @property
    def fp_top1(self) -> float | None:
        """The FP run's top-1 (%) on these very images, or None without an FP run."""
        if self.fp_pred is None:
            return None
        return 100.0 * float((self.fp_pred == self.label).double().mean())


# --------------------------------------------------------------------------- statistics


def candidate_usage(a: Analysis) -> Tensor:
    """Share of test images per layer and candidate: ``[L, K]``, or ``[L, 2, K]`` (w, a) when separate."""
    cand = torch.tensor(a.candidates, dtype=a.bits_w.dtype)

    def shares(bits: Tensor) -> Tensor:
        return (bits.unsqueeze(-1) == cand).double().mean(0)  # [L, K]

    if a.separate:
        return torch.stack([shares(a.bits_w), shares(a.bits_a)], dim=1)
    return shares(a.bits_w)


def quantile_bins(values: Tensor, q: int = 4) -> Tensor:
    """Bin ``0..q-1`` of each value by its average rank, so tied values always share a bin."""
    n = values.numel()
    ranks = rankdata(values)
    return ((ranks - 0.5) / n * q).floor().clamp(0, q - 1).long()


def accuracy_by_quantile(a: Analysis, q: int = 4) -> list[dict[str, Any]]:
    """Accuracy (and FP accuracy, mean difficulty) of the images in each BitOPs quantile.

    One row ("all") when BitOPs are constant (a static model).
    """
    bins = torch.zeros(a.n, dtype=torch.long) if a.bitops_constant else quantile_bins(a.bitops, q)
    rows = []
    for b in range(q):
        m = bins == b
        if not bool(m.any()):
            continue
        rel = a.bitops_rel[m]
        row: dict[str, Any] = {
            "bin": "all" if a.bitops_constant else f"Q{b + 1}",
            "n": int(m.sum()),
            "bitops_rel_min": float(rel.min()),
            "bitops_rel_max": float(rel.max()),
            "bitops_rel_mean": float(rel.mean()),
            "top1": 100.0 * float(a.correct[m].double().mean()),
            "difficulty_mean": float(a.difficulty[m].double().mean()),
        }
        if a.fp_pred is not None:
            row["fp_top1"] = 100.0 * float((a.fp_pred[m] == a.label[m]).double().mean())
        rows.append(row)
    return rows


def correlations(a: Analysis) -> dict[str, float]:
    """Spearman ρ between per-sample BitOPs and each available difficulty measure."""
    out = {"entropy": spearman(a.bitops, a.entropy)}
    if a.fp_loss is not None:
        out["fp_loss"] = spearman(a.bitops, a.fp_loss)
    return out


def extremes(a: Analysis, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` cheapest images (cheapest first) and the ``k`` most expensive
    (most expensive first); the two sets never overlap.

    Many images often share one cost, so ties are broken as :func:`tie_break_rule` says:
    one order by (BitOPs, difficulty, index), read from either end.
    """
    k = max(0, min(k, a.n // 2))
    order = torch.argsort(a.difficulty.double(), stable=True)  # stable: equal ones stay by index
    order = order[torch.argsort(a.bitops[order], stable=True)]
    return order[:k], order[a.n - k :].flip(0)


def tie_break_rule(a: Analysis) -> str:
    """The order :func:`extremes` gives images of equal BitOPs, in words for the report."""
    return (
        f"images of equal BitOPs are taken easiest first for the cheapest and hardest first "
        f"for the most expensive (by {a.difficulty_name}), then by test-set index (ascending "
        "for the cheapest, descending for the most expensive)"
    )


def boundary_tie(a: Analysis, chosen: Tensor) -> tuple[float, int, int] | None:
    """``(relative cost, chosen, total)`` when ``chosen`` takes only some of the images that
    share the cost of its last one (so the tie-break decided which), else None."""
    if chosen.numel() == 0:
        return None
    cost = a.bitops[chosen[-1]]
    total = int((a.bitops == cost).sum())
    taken = int((a.bitops[chosen] == cost).sum())
    return None if taken == total else (float(cost) / a.ref_bitops, taken, total)


# --------------------------------------------------------------------------- evaluation


def resolve_checkpoint(run: str | Path, checkpoint: str = "last") -> Path:
    """The ``last.pt``/``best.pt`` of a run folder, or a ``.pt`` file given directly."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"run {str(path)!r} not found")
    if checkpoint not in CHECKPOINTS:
        raise UserError(f"checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    ckpt = path / f"{checkpoint}.pt"
    if not ckpt.is_file():
        raise UserError(f"no {checkpoint}.pt in {str(path)!r} (is it a run folder?)")
    return ckpt


def _entropy_hook(store: list[Tensor]):
    def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
        logp = out.detach().float().log_softmax(1)
        store.append(-(logp.exp() * logp).sum(1).cpu())

    return hook


def _evaluate_with_entropy(
    model: nn.Module, loader: Any, ref_bits: int, progress: bool
) -> tuple[Any, Tensor]:
    from .evaluation import evaluate

    # A hook on the top module sees the logits of exactly the batches evaluate() scores.
    entropies: list[Tensor] = []
    handle = model.register_forward_hook(_entropy_hook(entropies))
    try:
        result = evaluate(model, loader, ref_bits, per_sample=True, progress=progress)
    finally:
        handle.remove()
    return result, torch.cat(entropies)


def data_identity(cfg: Config) -> tuple[str, str | None]:
    """What makes two runs' test sets and labels the same: the dataset and, for an image
    folder (whose classes are its sub-folders), the resolved folder."""
    if cfg.data.name == "imagefolder":
        return cfg.data.name, str(Path(cfg.data.root).expanduser().resolve())
    return cfg.data.name, None


def _describe(identity: tuple[str, str | None]) -> str:
    name, root = identity
    return repr(name) if root is None else f"{name} {root!r}"


def _check_fp_compatible(
    cfg: Config, info: Any, fp_cfg: Config, fp_info: Any, fp_path: Path
) -> None:
    if fp_cfg.recipe != "fp":
        raise UserError(
            f"--fp {str(fp_path)!r} is a {fp_cfg.recipe!r} run; give a full-precision (recipe fp) run"
        )
    # The FP model scores this run's labels: its class indices must mean the same classes.
    ours, theirs = data_identity(cfg), data_identity(fp_cfg)
    if ours != theirs:
        raise UserError(
            f"--fp run {str(fp_path)!r} was trained on {_describe(theirs)} "
            f"but this run on {_describe(ours)}; give an FP run on the same data"
        )
    if list(fp_info.classes) != list(info.classes):
        raise UserError(
            f"--fp run {str(fp_path)!r} has {len(fp_info.classes)} classes {list(fp_info.classes)} "
            f"but this run {len(info.classes)} classes {list(info.classes)}; "
            "give an FP run on the same data"
        )


def analyze(
    run: str | Path,
    fp_run: str | Path | None = None,
    checkpoint: str = "last",
    overrides: list[str] | None = None,
    progress: bool = True,
) -> Analysis:
    """Evaluate a static or dynamic run's checkpoint per sample (and the FP run on the same data).

    ``overrides`` are ``key=value`` changes to the stored config (e.g. ``device=cpu``);
    ``progress`` shows a bar per evaluation (when stderr is a terminal).
    """
    from .builder import load_for_eval
    from .evaluation import evaluate

    path = resolve_checkpoint(run, checkpoint)
    cfg, model, extra = load_for_eval(path, overrides)
    if cfg.recipe == "fp" or not isinstance(model, QuantModel):
        raise UserError(
            f"{str(run)!r} is a full-precision run: it has no BitOPs or bit choices to analyse; "
            "pass it as --fp to the report of a static or dynamic run"
        )
    fp_path = fp_model = None
    if fp_run is not None:
        # Checked before any evaluation, so a wrong --fp fails fast.
        fp_path = resolve_checkpoint(fp_run, checkpoint)
        fp_cfg, fp_model, fp_extra = load_for_eval(fp_path, overrides)
        _check_fp_compatible(cfg, extra["info"], fp_cfg, fp_extra["info"], fp_path)
    loader, info = extra["test_loader"], extra["info"]
    result, entropy = _evaluate_with_entropy(model, loader, cfg.ref_bits, progress)
    ps = result.per_sample
    if isinstance(model, DynamicQuantModel):
        layers = model.dynamic_layers
        candidates, separate = tuple(model.spec.bits), model.spec.separate
        budget = model.budget_target() if model.spec.budget.kind == "bitops" else None
    else:
        layers = model.quantized_layers
        candidates, separate, budget = (int(model.bits),), False, None
    ref = float(model.static_bitops(cfg.ref_bits))
    a = Analysis(
        name=cfg.name,
        recipe=cfg.recipe,
        model_name=cfg.model.name,
        dataset=cfg.data.name,
        checkpoint=str(path),
        method=cfg.quant.method,
        weight_bits=cfg.quant.weight_bits,
        data_root=data_identity(cfg)[1],
        classes=list(info.classes),
        layer_names=[i.name for i in layers],
        layer_macs=[int(i.macs) for i in layers],
        candidates=candidates,
        separate=separate,
        ref_bits=cfg.ref_bits,
        ref_bitops=ref,
        label=ps["label"],
        pred=ps["pred"],
        loss=ps["loss"],
        confidence=ps["prob"],
        entropy=entropy,
        bitops=ps["bitops"].double(),
        bits_w=ps["bits_w"],
        bits_a=ps["bits_a"],
        metrics=result.metrics,
        layers=list(model.layers),
        budget_rel=None if budget is None else float(budget) / ref,
        test_loader=loader,
    )
    if fp_model is not None:
        # The FP model sees the quantized run's own test loader: same images, same order.
        fp_model.to(getattr(loader, "device", "cpu"))
        fp_ps = evaluate(fp_model, loader, cfg.ref_bits, per_sample=True, progress=progress)
        fp = fp_ps.per_sample
        bad = int((fp["loss"].isnan() | fp["prob"].isnan()).sum())
        if bad:
            # A diverged FP model would otherwise fail later as "cannot rank NaN values".
            raise UserError(
                f"--fp run {str(fp_path)!r} gives a NaN loss or confidence on {bad} of "
                f"{len(fp['loss'])} test images (diverged weights?); give a trained FP run"
            )
        a.fp_run, a.fp_loss, a.fp_confidence, a.fp_pred = (
            str(fp_path),
            fp["loss"],
            fp["prob"],
            fp["pred"],
        )
    if isinstance(model, DynamicQuantModel):
        a.headroom = measure_headroom(model, loader, cfg.ref_bits, progress=progress)
        a.headroom.fp_loss = None if a.fp_loss is None else a.fp_loss.double()
    return a


def display_images(a: Analysis, indices: Tensor) -> Tensor | None:
    """Test images ``[k, C, H, W]`` as floats in 0..1 for display, or None if not reachable."""
    loader = a.test_loader
    data = getattr(loader, "data", None)
    if data is not None and hasattr(data, "images"):
        x = data.images[indices.cpu()]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    dataset = getattr(loader, "dataset", None)
    info = getattr(loader, "info", None)
    if dataset is None or info is None:
        return None
    # Streamed folders only hold normalized tensors: undo the normalization for display.
    x = torch.stack([dataset[int(i)][0] for i in indices])
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


# --------------------------------------------------------------------------- per-sample CSV


def csv_columns(a: Analysis) -> list[str]:
    cols = ["index", "label", "prediction", "correct", "bitops", "bitops_rel"]
    cols += ["loss", "confidence", "entropy"]
    if a.fp_loss is not None:
        cols += ["fp_loss", "fp_confidence"]
    for name in a.layer_names:
        cols += [f"bits_w:{name}", f"bits_a:{name}"] if a.separate else [f"bits:{name}"]
    return cols


def _num(v: float) -> int | float:
    # BitOPs are integer counts; print them without a trailing ".0".
    return int(v) if float(v).is_integer() else round(float(v), 6)


def write_csv(a: Analysis, path: str | Path) -> Path:
    """One row per test image, in test-set order; columns from :func:`csv_columns`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bw, ba = a.bits_w.tolist(), a.bits_a.tolist()
    rel = a.bitops_rel.tolist()
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(csv_columns(a))
        for i in range(a.n):
            row: list[Any] = [
                i,
                int(a.label[i]),
                int(a.pred[i]),
                int(a.correct[i]),
                _num(float(a.bitops[i])),
                round(rel[i], 6),
                round(float(a.loss[i]), 6),
                round(float(a.confidence[i]), 6),
                round(float(a.entropy[i]), 6),
            ]
            if a.fp_loss is not None and a.fp_confidence is not None:
                row += [round(float(a.fp_loss[i]), 6), round(float(a.fp_confidence[i]), 6)]
            for j in range(len(a.layer_names)):
                row += [_num(bw[i][j]), _num(ba[i][j])] if a.separate else [_num(bw[i][j])]
            w.writerow(row)
    return path
