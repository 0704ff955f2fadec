"""Training and evaluation for the recipes fp | static | dynamic (DQ)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import config as config_mod
from . import models
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, UserError
from .controller import annealed_tau
from .convert import DynamicQuantModel, DynamicSpec, QuantModel, dynamic, static
from .cost import BITOPS_CONVENTION, Budget, controller_cost
from .data import DatasetInfo, build_loaders


class NonFiniteLossError(UserError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
    return device


def example_input(info: DatasetInfo, device: torch.device | str = "cpu") -> Tensor:
    """A fixed random batch for the shape probe (random, so signed inputs show up as negative)."""
    gen = torch.Generator().manual_seed(1234)
    shape = (2, info.in_channels, info.image_size, info.image_size)
    return torch.randn(shape, generator=gen).to(device)


def spec_from_config(cfg: Config, signed: dict[str, bool] | None = None) -> DynamicSpec:
    q, b = cfg.quant, cfg.budget
    return DynamicSpec(
        method=q.method,
        bits=tuple(q.bits),
        budget=Budget(b.kind, b.target_bits, b.target_bitops, b.weight),
        tap=q.tap or models.DEFAULT_TAPS.get(cfg.model.name),
        fixed_bits=q.fixed_bits,
        first_last=q.first_last,
        exclude=tuple(q.exclude),
        separate=q.separate,
        share=q.share,
        signed=dict(signed or {}),
        hidden=q.hidden,
        dropout=q.dropout,
        controller_norm=q.controller_norm,
        tau=q.tau,
        tau_final=q.tau_final,
        sample_in_eval=q.sample_in_eval,
        execution=q.execution,
    )


def _load_init(fp: nn.Module, cfg: Config) -> None:
    """Full-precision weights from one of our fp checkpoints (a run dir or a .pt file)."""
    ckpt = load_checkpoint(cfg.model.init)
    src = ckpt.get("config", {}).get("model", {}).get("name")
    if ckpt.get("recipe") != "fp":
        raise CheckpointError(
            f"model.init {cfg.model.init!r} is a {ckpt.get('recipe')!r} checkpoint; "
            "initialise from a full-precision (recipe fp) run"
        )
    if src != cfg.model.name:
        raise CheckpointError(
            f"model.init {cfg.model.init!r} holds a {src!r} model but this run builds "
            f"{cfg.model.name!r}"
        )
    try:
        fp.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"model.init {cfg.model.init!r} does not fit: {first}") from None


def build_model(
    cfg: Config,
    info: DatasetInfo,
    device: torch.device,
    signed: dict[str, bool] | None = None,
    load_init: bool = True,
) -> nn.Module:
    """The network of ``cfg.recipe``; ``signed`` pins the signed-input decision per layer."""
    fp = models.get(
        cfg.model.name,
        num_classes=info.num_classes,
        pretrained=cfg.model.pretrained and load_init,
        in_channels=info.in_channels,
    ).to(device)
    if cfg.model.init and load_init:
        _load_init(fp, cfg)
    if cfg.recipe == "fp":
        return fp
    example = example_input(info, device)
    q = cfg.quant
    if cfg.recipe == "static":
        return static(
            fp, q.method, q.bits[0], example, q.first_last, tuple(q.exclude), q.share, signed
        )
    return dynamic(fp, spec_from_config(cfg, signed), example)


def signed_plan(model: nn.Module) -> dict[str, bool]:
    if isinstance(model, QuantModel):
        return {i.name: i.input_negative for i in model.quantized_layers}
    return {}


# --------------------------------------------------------------------------- optimisation


def _is_quant_param(name: str) -> bool:
    return ".wq." in name or ".aq." in name


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD; quantizer clip/step parameters get no weight decay unless asked."""
    o = cfg.optim
    groups: dict[str, dict[str, Any]] = {
        "backbone": {"params": [], "weight_decay": o.weight_decay, "lr": o.lr},
        "quantizer": {"params": [], "weight_decay": o.quant_weight_decay or 0.0, "lr": o.lr},
        "controller": {
            "params": [],
            "weight_decay": o.weight_decay,
            "lr": o.lr * o.controller_lr_scale,
        },
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "controller" if name.startswith("controller.") else "backbone"
        key = "quantizer" if _is_quant_param(name) else key
        groups[key]["params"].append(p)
    param_groups = []
    for key, g in groups.items():
        if g["params"]:
            param_groups.append({**g, "name": key, "base_lr": g["lr"]})
    return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the base learning rate at ``epoch_progress`` (fractional epochs done)."""
    o, total = cfg.optim, cfg.epochs
    if o.warmup_epochs > 0 and epoch_progress < o.warmup_epochs:
        return (epoch_progress + 1e-3) / o.warmup_epochs
    t = min(max(epoch_progress, 0.0), total)
    if o.schedule == "cosine":
        start = o.warmup_epochs
        return 0.5 * (1 + math.cos(math.pi * (t - start) / max(total - start, 1e-8)))
    if o.schedule == "multistep":
        return o.gamma ** sum(t >= m for m in o.milestones)
    if o.schedule == "onecycle":
        peak = 0.3 * total
        if t < peak:
            return 0.04 + 0.96 * t / peak
        return 0.5 * (1 + math.cos(math.pi * (t - peak) / max(total - peak, 1e-8)))
    return 1.0


def _set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    return opt.param_groups[0]["lr"]


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_sample: dict[str, Tensor] = field(default_factory=dict)


def _reference_bitops(model: nn.Module, ref_bits: int) -> float | None:
    return model.static_bitops(ref_bits) if isinstance(model, QuantModel) else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    ref_bits: int,
    per_sample: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Top-1/top-5, loss and (quantized models) per-sample BitOPs and bit statistics."""
    was_training = model.training
    model.eval()
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    keep: dict[str, list[Tensor]] = {
        k: [] for k in ("bitops", "bits_w", "bits_a", "pred", "label", "loss", "prob")
    }
    choice_counts = None
    ref = _reference_bitops(model, ref_bits)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        n += y.shape[0]
        loss_sum += float(losses.sum())
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        top1 += int((topk[:, 0] == y).sum())
        top5 += int((topk == y[:, None]).any(1).sum())
        if per_sample:
            keep["pred"].append(topk[:, 0].cpu())
            keep["label"].append(y.cpu())
            keep["loss"].append(losses.cpu())
            keep["prob"].append(logits.softmax(1).max(1).values.cpu())
        rec = getattr(model, "last", None)
        if rec is not None:
            keep["bitops"].append(rec.bitops.double().cpu())
            keep["bits_w"].append(rec.bits_w.cpu())
            keep["bits_a"].append(rec.bits_a.cpu())
            if rec.selection is not None:
                sel = rec.selection.sum(0).cpu()  # [L, K] or [L, 2, K]
                choice_counts = sel if choice_counts is None else choice_counts + sel
    model.train(was_training)
    if n == 0:
        raise UserError("the evaluation set is empty")
    metrics: dict[str, Any] = {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": loss_sum / n,
        "samples": n,
    }
    out = {k: torch.cat(v) for k, v in keep.items() if v}
    if "bitops" in out:
        bitops = out["bitops"]
        bits = (out["bits_w"] + out["bits_a"]) / 2
        metrics.update(
            bitops_mean=float(bitops.mean()),
            bitops_min=float(bitops.min()),
            bitops_max=float(bitops.max()),
            bitops_rel=float(bitops.mean()) / ref,
            bits_mean=float(bits.mean()),
        )
    if choice_counts is not None:
        counts = choice_counts.double()
        metrics["candidate_fraction"] = (counts / counts.sum(-1, keepdim=True)).tolist()
    return EvalResult(metrics, out if per_sample else {})


# --------------------------------------------------------------------------- training


class _Writer:
    """metrics.jsonl, plus TensorBoard event files when tensorboard is installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out or Path("runs") / cfg.name)


def _summary_entry(
    cfg: Config, model: nn.Module, metrics: dict[str, Any], best: float, wall: float
) -> dict:
    entry = {
        "name": cfg.name,
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "method": None if cfg.recipe == "fp" else cfg.quant.method,
        "bits": None if cfg.recipe == "fp" else list(cfg.quant.bits),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "best_top1": best,
        "bitops_mean": metrics.get("bitops_mean"),
        "bitops_rel": metrics.get("bitops_rel"),
        "bits_mean": metrics.get("bits_mean"),
        "reference_bits": None if cfg.recipe == "fp" else cfg.ref_bits,
        "epochs": cfg.epochs,
        "wall_s": round(wall, 1),
    }
    if isinstance(model, DynamicQuantModel):
        macs, params = controller_cost(model.controller, model.tap_shape)
        total = sum(i.macs for i in model.layers)
        entry.update(
            controller_macs=macs,
            controller_params=params,
            controller_overhead=macs / total,
            candidate_fraction=metrics.get("candidate_fraction"),
            bitops_min=metrics.get("bitops_min"),
            bitops_max=metrics.get("bitops_max"),
        )
    return entry


def write_summary(path: Path, runs: list[dict]) -> None:
    path.write_text(json.dumps({"runs": runs, "bitops_convention": BITOPS_CONVENTION}, indent=2))


def fit(
    cfg: Config,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` into its run directory; returns the run's summary entry."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = run_dir(cfg)
    last_path = out / "last.pt"
    if last_path.exists() and not (resume or overwrite):
        raise UserError(
            f"{str(out)!r} already holds a run; pass --resume to continue it or set out="
        )
    if overwrite and not resume:
        for name in ("metrics.jsonl", "last.pt", "best.pt", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    train_loader, test_loader, info = build_loaders(cfg.data, cfg.seed, device)
    state = load_checkpoint(last_path) if resume and last_path.exists() else None
    if state is not None:
        model = build_model(cfg, info, device, signed=state.get("signed"), load_init=False)
        model.load_state_dict(state["model"])
    else:
        model = build_model(cfg, info, device)
    config_mod.save(cfg, out / "config.yaml")
    opt = make_optimizer(model, cfg)
    start_epoch, best, wall = 0, -1.0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start_epoch, best, wall = state["epoch"], state["best_top1"], state.get("wall_s", 0.0)
    writer = _Writer(out, enabled=True)
    metrics: dict[str, Any] = dict(state["metrics"]) if state is not None else {}
    steps = len(train_loader)
    if steps == 0:
        raise UserError("the training set is empty (check data.limit and the batch size)")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            # Seeding per epoch makes a resumed run replay exactly the uninterrupted one.
            torch.manual_seed(cfg.seed * 1_000_003 + epoch)
            train_loader.set_epoch(epoch)
            if isinstance(model, DynamicQuantModel) and cfg.quant.tau_final is not None:
                model.set_temperature(
                    annealed_tau(cfg.quant.tau, cfg.quant.tau_final, epoch / max(cfg.epochs - 1, 1))
                )
            train_stats = _train_epoch(model, opt, train_loader, cfg, epoch, steps, progress)
            result = evaluate(model, test_loader, cfg.ref_bits)
            wall += time.time() - t0
            metrics = {
                "epoch": epoch + 1,
                **train_stats,
                **{f"test_{k}": v for k, v in result.metrics.items()},
            }
            writer.write({k: v for k, v in metrics.items() if k != "test_candidate_fraction"})
            fields = dict(
                config=cfg.to_dict(),
                recipe=cfg.recipe,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                epoch=epoch + 1,
                metrics=metrics,
                signed=signed_plan(model),
                wall_s=wall,
            )
            if result.metrics["top1"] > best:
                best = result.metrics["top1"]
                save_checkpoint(out / "best.pt", best_top1=best, **fields)
            save_checkpoint(last_path, best_top1=best, **fields)
            if progress:
                tqdm.write(_epoch_line(cfg, epoch, metrics))
    finally:
        writer.close()
    final = {k[len("test_") :]: v for k, v in metrics.items() if k.startswith("test_")}
    entry = _summary_entry(cfg, model, final, best, wall)
    write_summary(out / "summary.json", [entry])
    return entry


def _epoch_line(cfg: Config, epoch: int, m: dict[str, Any]) -> str:
    line = f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs}  loss {m['train_loss']:.3f}  top1 {m['test_top1']:.2f}%"
    if "test_bitops_rel" in m:
        line += f"  bits {m['test_bits_mean']:.2f}  BitOPs {m['test_bitops_rel']:.3f}x of {cfg.ref_bits}-bit"
    return line


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: Iterable[tuple[Tensor, Tensor]],
    cfg: Config,
    epoch: int,
    steps: int,
    progress: bool,
) -> dict[str, float]:
    model.train()
    ref = _reference_bitops(model, cfg.ref_bits)
    sums = {"loss": 0.0, "correct": 0.0, "n": 0, "bitops_rel": 0.0, "bits": 0.0, "budget": 0.0}
    lr = 0.0
    bar = tqdm(
        loader,
        total=steps,
        desc=f"{cfg.name} {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=None if progress else True,
    )
    for i, (x, y) in enumerate(bar):
        lr = _set_lr(opt, lr_factor(cfg, epoch + i / steps))
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        budget = model.budget_loss() if isinstance(model, DynamicQuantModel) else None
        total = loss + budget if budget is not None else loss
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"loss became {float(total)} at epoch {epoch + 1}, step {i + 1}; "
                "the last good checkpoint is kept (lower optim.lr?)"
            )
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        b = y.shape[0]
        sums["n"] += b
        sums["loss"] += float(loss.detach()) * b
        sums["correct"] += float((logits.argmax(1) == y).sum())
        if budget is not None:
            sums["budget"] += float(budget.detach()) * b
        rec = getattr(model, "last", None)
        if rec is not None:
            sums["bitops_rel"] += float(rec.bitops.detach().mean()) / ref * b
            sums["bits"] += float(((rec.bits_w + rec.bits_a) / 2).detach().mean()) * b
        if progress and (i % 10 == 0 or i == steps - 1):
            post = {
                "loss": f"{sums['loss'] / sums['n']:.3f}",
                "acc": f"{100 * sums['correct'] / sums['n']:.1f}",
            }
            if rec is not None:
                post["bits"] = f"{sums['bits'] / sums['n']:.2f}"
                post["BitOPs"] = f"{sums['bitops_rel'] / sums['n']:.3f}x"
            bar.set_postfix(post)
    n = max(sums["n"], 1)
    stats = {"lr": lr, "train_loss": sums["loss"] / n, "train_top1": 100 * sums["correct"] / n}
    if isinstance(model, QuantModel):
        stats.update(train_bitops_rel=sums["bitops_rel"] / n, train_bits_mean=sums["bits"] / n)
    if isinstance(model, DynamicQuantModel):
        stats.update(train_budget_loss=sums["budget"] / n, tau=model.tau)
    return stats


# --------------------------------------------------------------------------- checkpoints


def load_for_eval(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[Config, nn.Module, dict]:
    """Rebuild the model of a checkpoint (config inside it, plus overrides) and load its weights."""
    ckpt = load_checkpoint(path)
    cfg = config_mod.from_dict(ckpt["config"], overrides)
    device = resolve_device(cfg.device)
    _, test_loader, info = build_loaders(cfg.data, cfg.seed, device)
    model = build_model(cfg, info, device, signed=ckpt.get("signed"), load_init=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model it describes: {first}"
        ) from None
    return cfg, model, {"ckpt": ckpt, "test_loader": test_loader, "info": info}
