"""Building the network of a run: device, model registry, initialisation, quantization."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import config as config_mod
from . import models
from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .config import Config, UserError
from .convert import DynamicQuantModel, DynamicSpec, QuantModel, dynamic, static
from .cost import Budget
from .data import DatasetInfo, build_loaders


def resolve_device(name: str) -> torch.device:
    """The torch device of ``device=``; a malformed or absent device is a one-line UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "allowed: auto, cpu, cuda, cuda:N (N a device index), mps"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'device': {name!r} is not a device; {allowed}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for but CUDA is not available; use device=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for but MPS is not available; use device=cpu")
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
        tap=q.tap,
        fixed_bits=q.fixed_bits,
        first_last=q.first_last,
        exclude=tuple(q.exclude),
        separate=q.separate,
        weight_bits=q.weight_bits,
        share=q.share,
        signed=dict(signed or {}),
        hidden=q.hidden,
        dropout=q.dropout,
        controller_norm=q.controller_norm,
        controller_grid=q.controller_grid,
        controller_stats=q.controller_stats,
        candidate_bn=q.candidate_bn,
        tau=q.tau,
        tau_final=q.tau_final,
        sample_in_eval=q.sample_in_eval,
        execution=q.execution,
        product_bits=q.product_bits,
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
    load_model_state(fp, ckpt["model"], f"model.init {cfg.model.init!r}")


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
    example = example_input(info, device)
    _check_input_fits(fp, example, cfg.model.name)
    if cfg.recipe == "fp":
        return fp
    q = cfg.quant
    if cfg.recipe == "static":
        return static(
            fp,
            q.method,
            q.bits[0],
            example,
            q.first_last,
            tuple(q.exclude),
            q.share,
            signed,
            q.product_bits,
            q.weight_bits,
            q.layer_bits,
        )
    return dynamic(fp, spec_from_config(cfg, signed), example)


def init_model(cfg: Config, info: DatasetInfo, device: torch.device) -> nn.Module | None:
    """The full-precision model a quantized run started from (``model.init``), or None."""
    if not cfg.model.init or cfg.recipe == "fp":
        return None
    fp = models.get(cfg.model.name, info.num_classes, in_channels=info.in_channels).to(device)
    _load_init(fp, cfg)
    return fp


def _check_input_fits(model: nn.Module, example: Tensor, name: str) -> None:
    """Fail early, in one line, when the data's images cannot go through the model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"model {name!r} does not accept the data's images of shape "
            f"{tuple(example.shape[1:])} (channels, height, width): {first}"
        ) from None
    finally:
        model.train(was_training)


def signed_plan(model: nn.Module) -> dict[str, bool]:
    if isinstance(model, QuantModel):
        return {i.name: i.input_negative for i in model.quantized_layers}
    return {}


def load_for_eval(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[Config, nn.Module, dict]:
    """Rebuild the model of a checkpoint (config inside it, plus overrides) and load its weights."""
    ckpt = load_checkpoint(path)
    cfg = config_mod.from_dict(ckpt["config"], overrides)
    device = resolve_device(cfg.device)
    _, test_loader, info = build_loaders(cfg.data, cfg.seed, device)
    model = _model_of_checkpoint(ckpt, cfg, info, device, f"checkpoint {str(path)!r}")
    return cfg, model, {"ckpt": ckpt, "test_loader": test_loader, "info": info}


def load_teacher(path: str | Path, info: DatasetInfo, device: torch.device) -> nn.Module:
    """The trained run at ``path`` (any recipe) as a frozen teacher for a run on ``info``'s
    data: ``distill.teacher=checkpoint``."""
    ckpt = load_checkpoint(path)
    cfg = config_mod.from_dict(ckpt["config"])
    what = f"distill.checkpoint {str(path)!r}"
    if cfg.data.name != info.name:
        raise CheckpointError(
            f"{what} was trained on {cfg.data.name!r}, but this run trains on {info.name!r}"
        )
    teacher = _model_of_checkpoint(ckpt, cfg, info, device, what)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _model_of_checkpoint(
    ckpt: dict, cfg: Config, info: DatasetInfo, device: torch.device, what: str
) -> nn.Module:
    model = build_model(cfg, info, device, signed=ckpt.get("signed"), load_init=False)
    load_model_state(model, ckpt["model"], what)
    if isinstance(model, DynamicQuantModel):
        # The temperature is not a tensor of the state: set it as training last left it.
        trained = ckpt.get("epoch", 0) if ckpt.get("step", 0) else ckpt.get("epoch", 0) - 1
        model.set_progress(epoch_progress(cfg, max(trained, 0)))
    return model


def epoch_progress(cfg: Config, epoch: int) -> float:
    """How far the controller's training is at (0-based) ``epoch``, 0 → 1: the temperature
    anneals over the epochs after the random-choice warm-up (``quant.random_epochs``) and
    before the controller-only ones (``quant.controller_epochs``, which keep the last)."""
    start, end = cfg.quant.random_epochs, cfg.network_epochs
    return min(max(epoch - start, 0) / max(end - 1 - start, 1), 1.0)
