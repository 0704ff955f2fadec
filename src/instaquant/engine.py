"""Training for the recipes fp | static | dynamic (DQ): optimiser, schedule, loop, checkpoints."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import config as config_mod
from . import distributed
from .builder import (
    build_model,
    epoch_progress,
    init_model,
    load_teacher,
    resolve_device,
    signed_plan,
)
from .checkpoint import atomic_save, load_checkpoint, load_model_state, save_checkpoint
from .config import Config, UserError
from .convert import DynamicQuantModel, QuantModel
from .cost import BITOPS_CONVENTION, controller_cost, reference_label
from .data import RANK_STRIDE, build_loaders
from .distributed import DistContext
from .evaluation import evaluate, reference_bitops
from .headroom import measure_headroom
from .losses import distillation_loss, rank_loss
from .quant.methods import InitFlags
from .saving import describe


class NonFiniteLossError(UserError):
    pass


def _is_quant_param(name: str) -> bool:
    return ".wq." in name or ".aq." in name


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD (or AdamW); quantizer clip/step parameters get no weight decay unless asked."""
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
    if o.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=o.lr)
    return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the base learning rate at ``epoch_progress`` (fractional epochs done).

    The schedule spans the epochs that train the network: it ends where the controller-only
    epochs (``quant.controller_epochs``) begin, so the network finishes its schedule first.
    """
    o, total = cfg.optim, cfg.network_epochs
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


def controller_only_lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of the controller's base learning rate in the controller-only epochs
    (``quant.controller_epochs``): a cosine of its own from 1 to 0 over them, since the main
    schedule has run out there."""
    n = cfg.quant.controller_epochs
    t = min(max(epoch_progress - cfg.network_epochs, 0.0), n)
    return 0.5 * (1 + math.cos(math.pi * t / n))


def _set_controller_only_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    """The controller's group at ``factor`` of its base rate, every other group at 0: SGD's
    and AdamW's updates (momentum and weight decay included) then leave those weights as
    they are."""
    lr = 0.0
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor if g["name"] == "controller" else 0.0
        lr = g["lr"] if g["name"] == "controller" else lr
    return lr


class _Writer:
    """metrics.jsonl, plus TensorBoard event files when tensorboard is installed (rank 0)."""

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

    def truncate(self, epochs_done: int) -> None:
        """Drop rows of epochs after the checkpoint (a kill between row and checkpoint), and
        a last row torn by a kill or a full disk while it was appended."""
        if not self.path.exists():
            return
        rows = [r for r in self.path.read_text().splitlines() if r.strip()]
        keep = []
        for n, row in enumerate(rows, 1):
            try:
                epoch = json.loads(row).get("epoch", 0)
            except json.JSONDecodeError:
                if n == len(rows):
                    break  # torn while appended: the checkpoint never counted it
                raise UserError(f"{str(self.path)!r} line {n} is not a JSON row") from None
            if epoch <= epochs_done:
                keep.append(row)
        if len(keep) != len(rows):
            atomic_save("".join(r + "\n" for r in keep), self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class RunInterruptedError(UserError):
    """SIGTERM or Ctrl-C arrived; a resumable checkpoint was saved first."""


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the training loop checks between steps.

    A second signal raises ``KeyboardInterrupt`` at once: the way out of work that checks no
    flag (decoding an image folder), with the checkpoint on disk intact (atomic writes).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"second stop signal ({name})")
        self.received = name
        tqdm.write(
            f"{name}: stopping at the next training step with a resumable checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        "weight_bits": None if cfg.recipe == "fp" else cfg.quant.weight_bits,
        **({"layer_bits": dict(cfg.quant.layer_bits)} if cfg.quant.layer_bits else {}),
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
            budget_kind=cfg.budget.kind,
            budget_bits=cfg.budget.target_bits,
            candidate_fraction=metrics.get("candidate_fraction"),
            bitops_min=metrics.get("bitops_min"),
            bitops_max=metrics.get("bitops_max"),
        )
    return entry


def write_summary(path: Path, runs: list[dict]) -> None:
    atomic_save(json.dumps({"runs": runs, "bitops_convention": BITOPS_CONVENTION}, indent=2), path)


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise UserError(
            f"{str(out)!r} already holds a run; pass --resume to continue it or set out="
        )
    if overwrite and not resume:
        for name in ("metrics.jsonl", "last.pt", "best.pt", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _has_uninitialised_quantizers(model: nn.Module) -> bool:
    return any(isinstance(m, InitFlags) and not m.all_initialized() for m in model.modules())


def _sync_lazy_init(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Run one batch so data-dependent quantizer parameters exist before DDP broadcasts
    rank 0's parameters and buffers: every rank then starts from identical values."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        x, _ = next(iter(loader))
        model(x)
    model.train(was_training)


def _check_same_world(state: dict[str, Any], world: int, path: Path) -> None:
    """A mid-epoch checkpoint resumes only with its number of processes: the steps to skip
    count batches of that many shards."""
    saved = state.get("world", world)  # unknown in checkpoints written before it was recorded
    if state.get("step", 0) and saved != world:
        raise UserError(
            f"{str(path)!r} was stopped mid-epoch by {saved} process(es), this run has {world}: "
            f"resume it with {saved}; the count may change only between epochs "
            "(train with --stop-after-epoch to stop at an epoch's end)"
        )


def fit(
    cfg: Config,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into its run directory; returns the run's summary entry.

    ``stop_after_epoch`` ends the run after that epoch as if it had been stopped
    (a later ``resume=True`` continues it). Under torchrun every rank trains its
    shard; rank 0 writes the files.
    """
    return train_model(cfg, resume, progress, overwrite, stop_after_epoch)[0]


def train_model(
    cfg: Config,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """:func:`fit` that also returns the trained (unwrapped) model."""
    resolve_device(cfg.device)
    ctx = distributed.setup(cfg.device)
    try:
        # Handlers first: a SIGTERM during set-up still ends in a resumable checkpoint.
        with _StopSignals() as stop:
            return _train(
                cfg, ctx, stop, resume, progress and ctx.is_main, overwrite, stop_after_epoch
            )
    finally:
        distributed.teardown(ctx)


def _train(
    cfg: Config,
    ctx: DistContext,
    stop: _StopSignals,
    resume: bool,
    progress: bool,
    overwrite: bool,
    stop_after_epoch: int | None,
) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(cfg.seed)
    out = run_dir(cfg)
    last_path = out / "last.pt"
    if ctx.is_main:
        _prepare_run_dir(out, resume, overwrite)
    ctx.barrier()
    train_loader, test_loader, info = build_loaders(
        cfg.data, cfg.seed, ctx.device, ctx.rank, ctx.world, progress=progress
    )
    state = load_checkpoint(last_path) if resume and last_path.exists() else None
    if resume and state is None and ctx.is_main:
        tqdm.write(f"no checkpoint in {str(out)!r} to resume from: starting the run")
    if state is not None:
        _check_same_world(state, ctx.world, last_path)
        model = build_model(cfg, info, ctx.device, signed=state.get("signed"), load_init=False)
        load_model_state(
            model,
            state["model"],
            f"{str(last_path)!r} (resume with the run's own settings: its config.yaml)",
        )
    else:
        model = build_model(cfg, info, ctx.device)
    if ctx.is_main:
        config_mod.save(cfg, out / "config.yaml")
    steps = len(train_loader)
    if steps == 0:
        raise UserError("the training set is empty (check data.limit and the batch size)")
    net: nn.Module = model
    if ctx.enabled:
        # Not on an initialised resumed model: a training forward would move its BN
        # statistics (and LQ-Nets bases) away from where the stopped run left them.
        if state is None or _has_uninitialised_quantizers(model):
            _sync_lazy_init(model, train_loader)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = make_optimizer(model, cfg)
    teacher = _teacher(cfg, info, ctx.device)
    start_epoch, skip_steps, best, wall = 0, 0, -1.0, 0.0
    metrics: dict[str, Any] = {}
    mid_epoch: dict[str, Any] | None = None  # random state and running sums of a stopped epoch
    if state is not None:
        # Momentum buffers come from the checkpoint, learning rates from this config.
        configured = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for g, (base_lr, wd) in zip(opt.param_groups, configured, strict=True):
            g["base_lr"], g["weight_decay"] = base_lr, wd
        start_epoch, skip_steps = state["epoch"], state.get("step", 0)
        best, wall, metrics = state["best_top1"], state.get("wall_s", 0.0), dict(state["metrics"])
        mid_epoch = state.get("mid_epoch") if skip_steps else None
    writer = _Writer(out, enabled=ctx.is_main)
    if ctx.is_main:
        writer.truncate(start_epoch)

    def checkpoint(
        epoch: int,
        step: int,
        result_metrics: dict[str, Any] | None,
        mid_epoch: dict[str, Any] | None = None,
    ) -> None:
        nonlocal best
        # Every rank follows the best (the metrics are all-reduced): fit returns it everywhere.
        improved = result_metrics is not None and result_metrics["top1"] > best
        if improved:
            best = result_metrics["top1"]
        if not ctx.is_main:
            return
        fields = dict(
            mid_epoch=mid_epoch,
            config=cfg.to_dict(),
            recipe=cfg.recipe,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            epoch=epoch,
            step=step,
            metrics=metrics,
            signed=signed_plan(model),
            # The same entry as iq.save's: iq.load reads run checkpoints too.
            quant_model=describe(model) if isinstance(model, QuantModel) else None,
            wall_s=wall,
            world=ctx.world,
        )
        if improved:
            save_checkpoint(out / "best.pt", best_top1=best, **fields)
        save_checkpoint(last_path, best_top1=best, **fields)

    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    try:
        for epoch in range(start_epoch, last_epoch):
            t0 = time.time()
            # Seeding per epoch makes a resumed run replay exactly the uninterrupted one; each
            # rank its own stream (Gumbel noise, dropout), rank 0 that of a single process.
            torch.manual_seed(cfg.seed * 1_000_003 + epoch + RANK_STRIDE * ctx.rank)
            train_loader.set_epoch(epoch)
            if isinstance(model, DynamicQuantModel):
                model.set_random_choices(epoch < cfg.quant.random_epochs)
                model.set_progress(epoch_progress(cfg, epoch))
            loop = _EpochLoop(net, model, opt, cfg, ctx, epoch, steps, progress, stop, teacher)
            train_stats = loop.run(train_loader, skip_steps, mid_epoch)
            wall += time.time() - t0
            if loop.stopped_at is not None:
                mid = loop.mid_epoch_state()  # a collective: on every rank, before the save
                checkpoint(epoch, loop.stopped_at, None, mid)
                raise RunInterruptedError(
                    f"{loop.stop_reason}: saved a resumable checkpoint at epoch {epoch + 1}, "
                    f"step {loop.stopped_at}/{steps} in {str(last_path)!r}; "
                    "continue with --resume"
                )
            skip_steps, mid_epoch = 0, None
            ctx.broadcast_buffers(model)
            result = evaluate(model, test_loader, cfg.ref_bits, ctx=ctx, progress=progress)
            metrics = {
                "epoch": epoch + 1,
                **train_stats,
                **{f"test_{k}": v for k, v in result.metrics.items()},
            }
            writer.write({k: v for k, v in metrics.items() if k != "test_candidate_fraction"})
            checkpoint(epoch + 1, 0, result.metrics)
            if progress:
                tqdm.write(_epoch_line(cfg, epoch, metrics))
    finally:
        writer.close()
    if metrics.get("epoch") != cfg.epochs:  # stopped early on purpose: no summary yet
        return {}, model
    final = {k[len("test_") :]: v for k, v in metrics.items() if k.startswith("test_")}
    entry = _summary_entry(cfg, model, final, best, wall)
    if isinstance(model, DynamicQuantModel) and not ctx.enabled:
        # One process sees the whole test set (DDP shards it): `instaquant report` measures it.
        fp = init_model(cfg, info, ctx.device)
        room = measure_headroom(model, test_loader, cfg.ref_bits, fp, progress)
        entry["headroom"] = room.summary()
    if ctx.is_main:
        write_summary(out / "summary.json", [entry])
    return entry, model


def _teacher(cfg: Config, info: Any, device: torch.device) -> nn.Module | None:
    """The frozen teacher of ``distill.teacher=fp`` (the model.init network) or ``checkpoint``
    (the trained run at ``distill.checkpoint``)."""
    if cfg.distill.teacher == "checkpoint":
        return load_teacher(cfg.distill.checkpoint, info, device)
    if cfg.distill.teacher != "fp":
        return None
    teacher = init_model(cfg, info, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _epoch_line(cfg: Config, epoch: int, m: dict[str, Any]) -> str:
    line = (
        f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs}  loss {m['train_loss']:.3f}  "
        f"top1 {m['test_top1']:.2f}%"
    )
    if "test_bitops_rel" in m:
        line += (
            f"  bits {m['test_bits_mean']:.2f}  "
            f"BitOPs {m['test_bitops_rel']:.3f}x of "
            f"{reference_label(cfg.ref_bits, cfg.quant.weight_bits)}"
        )
    if m.get("controller_only"):
        line += "  (controller only)"
    return line


@contextmanager
def _running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics (and batch counts) restored on exit."""
    kept = [
        (buf, buf.clone())
        for name, buf in model.named_buffers()
        if name.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")
    ]
    try:
        yield
    finally:
        for buf, value in kept:
            buf.copy_(value)


class _EpochLoop:
    """One training epoch: forward, CE (+ budget), backward, step; running statistics."""

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        cfg: Config,
        ctx: DistContext,
        epoch: int,
        steps: int,
        progress: bool,
        stop: _StopSignals,
        teacher: nn.Module | None = None,
    ) -> None:
        self.net, self.model, self.opt, self.cfg, self.ctx = net, model, opt, cfg, ctx
        self.teacher = teacher
        self.epoch, self.steps, self.progress, self.stop = epoch, steps, progress, stop
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self.ref = reference_bitops(model, cfg.ref_bits)
        # The last quant.controller_epochs: the network frozen, only the controller trains.
        self.controller_only = isinstance(model, DynamicQuantModel) and (
            epoch >= cfg.network_epochs
        )
        # n, loss, correct, budget, bitops_rel, bits, rank correlation, ranked n: summed over
        # samples, reduced over ranks.
        self.sums = torch.zeros(8, dtype=torch.float64)

    def run(
        self,
        loader: Iterable[tuple[Tensor, Tensor]],
        skip: int,
        mid_epoch: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Train on ``loader``'s batches after the first ``skip``; ``mid_epoch`` (from
        :meth:`mid_epoch_state` of the stopped run) restores where that run stood."""
        self.net.train()
        if self.controller_only:
            self.model.train_controller_only()
        cfg, lr = self.cfg, 0.0
        bar = tqdm(
            loader,
            total=self.steps,
            desc=f"{cfg.name} {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if self.progress else True,
        )
        for i, (x, y) in enumerate(bar):
            if i < skip:  # resuming mid-epoch: the batch order is replayed, the work is not
                continue
            if i == skip and mid_epoch is not None:
                self._restore(mid_epoch)
            if self._agree_to_stop():
                self.stopped_at = i
                break
            progress = self.epoch + i / self.steps
            if self.controller_only:
                lr = _set_controller_only_lr(self.opt, controller_only_lr_factor(cfg, progress))
            else:
                lr = _set_lr(self.opt, lr_factor(cfg, progress))
            self._step(x, y, i)
            if self.progress and (i % 10 == 0 or i == self.steps - 1):
                bar.set_postfix(self._postfix())
        bar.close()
        return self._stats(lr)

    def _agree_to_stop(self) -> bool:
        """Whether a stop signal reached any rank: all ranks stop at the same step, since
        one stopping alone would leave the others waiting in DDP's gradient all_reduce."""
        received = self.stop.received
        if self.ctx.enabled:
            signum = torch.tensor([int(signal.Signals[received]) if received else 0])
            signum = int(self.ctx.all_reduce(signum.to(self.ctx.device), "max"))
            received = signal.Signals(signum).name if signum else None
        self.stop_reason = received
        return received is not None

    def mid_epoch_state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this stopped epoch exactly: the random state
        (Gumbel noise, dropout) and the running sums of the epoch's training statistics.

        Under DDP a collective (the sums over all ranks): call it on every rank.
        """
        # Every rank's generator state (each rank draws its own noise); collectives, so in
        # the same order on every rank.
        state: dict[str, Any] = {"rng": torch.get_rng_state()}
        state["rank_rng"] = self.ctx.all_gather(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
            if self.ctx.device.type == "cuda":
                own = torch.cuda.get_rng_state(self.ctx.device)
                state["rank_cuda_rng"] = self.ctx.all_gather(own)
        state["sums"] = self.ctx.all_reduce(self.sums.clone().to(self.ctx.device)).cpu()
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        rank = self.ctx.rank
        torch.set_rng_state(state.get("rank_rng", [state["rng"]] * (rank + 1))[rank])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
            if "rank_cuda_rng" in state and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(state["rank_cuda_rng"][rank], self.ctx.device)
        # The sums over all ranks go to rank 0 alone: the epoch's final all_reduce adds them once.
        if "sums" in state and self.ctx.is_main:
            sums = state["sums"]  # a checkpoint of an older version may hold fewer sums
            self.sums[: sums.numel()] = sums

    def _forward_at(self, bits: int, x: Tensor) -> Tensor:
        """Logits with every dynamic layer at ``bits``, through the unwrapped model: under DDP
        the one backward of the summed loss still reduces every gradient once, through the
        wrapper's own (controller) forward."""
        model = self.model
        with model.forced_bits([bits] * len(model.dynamic_layers)):
            return model(x)

    def _distill(self, x: Tensor, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The teacher's logits (detached) and any loss of its own to add
        (``distill.teacher=highest``: the highest candidate, trained on the same batch, teaches
        the others)."""
        teacher = self.cfg.distill.teacher
        if teacher in ("fp", "checkpoint"):
            with torch.no_grad():
                return self.teacher(x), None
        if teacher == "highest" and self.controller_only:  # its own loss trains no controller
            with torch.no_grad():
                return self._forward_at(max(self.model.spec.bits), x), None
        if teacher == "highest":
            logits = self._forward_at(max(self.model.spec.bits), x)
            return logits.detach(), F.cross_entropy(logits, y)
        return None, None

    def _measured_ce(self, x: Tensor, y: Tensor, bits: list[int]) -> list[Tensor]:
        """Per-image CE with every dynamic layer at each of ``bits``, without gradient. These
        forwards only measure: the BatchNorm running statistics are left as they were (and
        restored before any forward that backpropagates, whose saved tensors they are)."""
        with torch.no_grad(), _running_stats_kept(self.model):
            return [F.cross_entropy(self._forward_at(b, x), y, reduction="none") for b in bits]

    def _step(self, x: Tensor, y: Tensor, i: int) -> None:
        dynamic = isinstance(self.model, DynamicQuantModel)
        # Not in the random-choice warm-up: no controller runs there to be ranked.
        warm_up = self.epoch < self.cfg.quant.random_epochs
        ranking = dynamic and self.cfg.budget.rank_weight > 0 and not warm_up
        if ranking:  # the gain: per-image CE at the lowest candidate minus at the highest
            lowest, highest = min(self.model.spec.bits), max(self.model.spec.bits)
            reuse = self.cfg.distill.teacher == "highest"  # its forward gives the highest CE
            measured = self._measured_ce(x, y, [lowest] if reuse else [lowest, highest])
        teacher_logits, teacher_loss = self._distill(x, y)
        gain = None
        if ranking:
            ce_highest = (
                F.cross_entropy(teacher_logits, y, reduction="none") if reuse else measured[1]
            )
            gain = measured[0] - ce_highest
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        budget = self.model.budget_loss() if dynamic else None
        total = loss + budget if budget is not None else loss
        if teacher_logits is not None:
            d = self.cfg.distill
            total = total + d.weight * distillation_loss(logits, teacher_logits, d.temperature)
        if teacher_loss is not None:
            total = total + teacher_loss
        expected = self.model.expected_bitops() if ranking else None
        ranked = rank_loss(expected, gain) if expected is not None else None
        if ranked is not None:
            total = total + self.cfg.budget.rank_weight * ranked
        if not torch.isfinite(total):
            what = (
                "the input batch holds NaN or inf"
                if not torch.isfinite(x).all()
                else (f"loss became {float(total.detach())}")
            )
            raise NonFiniteLossError(
                f"{what} at epoch {self.epoch + 1}, step {i + 1}; stopped, the last good "
                "checkpoint is kept (check the data, or lower optim.lr)"
            )
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        b = y.shape[0]
        s = self.sums
        s[0] += b
        s[1] += float(loss.detach()) * b
        s[2] += float((logits.argmax(1) == y).sum())
        if budget is not None:
            s[3] += float(budget.detach()) * b
        rec = getattr(self.model, "last", None)
        if rec is not None:
            s[4] += float(rec.bitops.detach().mean()) / self.ref * b
            s[5] += float(((rec.bits_w + rec.bits_a) / 2).detach().mean()) * b
        if ranked is not None:
            s[6] += (1.0 - float(ranked.detach())) * b
            s[7] += b

    def _postfix(self) -> dict[str, str]:
        s = self.sums
        n = max(float(s[0]), 1.0)
        post = {"loss": f"{float(s[1]) / n:.3f}", "acc": f"{100 * float(s[2]) / n:.1f}"}
        if self.ref is not None:
            post["bits"] = f"{float(s[5]) / n:.2f}"
            post["BitOPs"] = f"{float(s[4]) / n:.3f}x"
        return post

    def _stats(self, lr: float) -> dict[str, float]:
        # A copy: the rank's own sums stay for mid_epoch_state after a stop.
        s = self.ctx.all_reduce(self.sums.clone().to(self.ctx.device)).cpu()
        n = max(float(s[0]), 1.0)
        stats = {
            "lr": lr,
            "train_loss": float(s[1]) / n,
            "train_top1": 100 * float(s[2]) / n,
            "train_samples": int(s[0]),
        }
        if isinstance(self.model, QuantModel):
            stats.update(train_bitops_rel=float(s[4]) / n, train_bits_mean=float(s[5]) / n)
        if isinstance(self.model, DynamicQuantModel):
            stats.update(train_budget_loss=float(s[3]) / n, tau=self.model.tau)
            stats.update(controller_only=self.controller_only)
            if s[7] > 0:  # Pearson(expected BitOPs, rank of the gain) over the ranked batches
                stats.update(train_rank_corr=float(s[6]) / float(s[7]))
        return stats
