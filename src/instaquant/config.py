"""Run configuration: nested dataclasses loaded from YAML, with ``key=value`` overrides.

Every key is checked: an unknown key or a bad value raises :class:`ConfigError`,
a one-line message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cost import BUDGET_KINDS
from .errors import UserError

RECIPES = ("fp", "static", "dynamic")
SCHEDULES = ("cosine", "multistep", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
DATASETS = (
    "digits",
    "digits_noise",
    "digits_contrast",
    "digits_blend",
    "digits_overlay",
    "digits_mixed",
    "cifar10",
    "cifar100",
    "imagefolder",
)
# String keys documented as yes | no, which YAML 1.1 reads (unquoted) as booleans.
YES_NO_KEYS = ("data.cache",)


class ConfigError(UserError):
    pass


@dataclass
class ModelConfig:
    name: str = "resnet20"
    pretrained: bool = False
    init: str | None = None  # full-precision checkpoint of ours (run dir or .pt) to start from


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 256
    image_size: int | None = None  # default: the dataset's own (8, 32, or 224 for imagefolder)
    limit: int | None = None  # use only this many train and test images (quick runs)
    augment: bool = True
    workers: int = 4  # for streamed (large) image folders only
    cache: str = "auto"  # auto | yes | no: decode an image folder once into a tensor file
    cache_dir: str | None = None  # default ~/.cache/instaquant


@dataclass
class QuantConfig:
    method: str = "pact"
    bits: list[int] = field(default_factory=lambda: [3, 4, 5])
    tap: str | None = None
    fixed_bits: int | None = None
    first_last: str = "fp"
    exclude: list[str] = field(default_factory=list)
    separate: bool = False
    weight_bits: int | None = None  # weights fixed at these bits; bits then name activations
    share: bool = False
    hidden: int = 128
    dropout: float = 0.1
    controller_norm: bool = True
    controller_grid: int = 1  # tap averaged over grid x grid cells (1: global pooling)
    controller_stats: bool = False  # + per-channel std and gradient energy of the tap
    candidate_bn: bool = False  # one BatchNorm per candidate after each dynamic conv
    random_epochs: int = 0  # first epochs: random candidates per image, controller frozen
    controller_epochs: int = 0  # last epochs: only the controller trains, network frozen
    tau: float = 1.0
    tau_final: float | None = None
    sample_in_eval: bool = False
    execution: str = "fast"
    product_bits: int | None = None  # attention's matrix products quantized at these bits
    # Static mixed precision: fnmatch pattern of layer names -> bits (first match wins).
    layer_bits: dict[str, int] = field(default_factory=dict)


@dataclass
class BudgetConfig:
    kind: str = "bitops"
    target_bits: float | None = 4.0
    target_bitops: float | None = None
    weight: float = 1.0
    # Weight of the ranking loss: images whose loss drops most from the lowest to the highest
    # candidate should get the most expected BitOPs (see losses.rank_loss). 0: off.
    rank_weight: float = 0.0


DISTILL_TEACHERS = ("none", "fp", "highest", "checkpoint")


@dataclass
class DistillConfig:
    # none | fp (the model.init network) | highest (top candidate) | checkpoint (the trained
    # run at distill.checkpoint, e.g. a static model at more bits, frozen)
    teacher: str = "none"
    checkpoint: str | None = None  # a run folder or .pt file, for teacher=checkpoint
    weight: float = 1.0  # of the distillation term added to the loss
    temperature: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    quant_weight_decay: float | None = None  # clip/step parameters: none unless asked
    controller_lr_scale: float = 1.0
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=list)  # epochs (may be fractional)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    name: str = "sgd"  # sgd | adamw (transformers); momentum/nesterov apply to sgd


@dataclass
class Config:
    name: str = "run"
    recipe: str = "dynamic"
    seed: int = 0
    epochs: int = 1
    device: str = "auto"
    out: str | None = None  # default runs/<name>
    reference_bits: int | None = None  # relative BitOPs reference; default the middle candidate
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def network_epochs(self) -> int:
        """The epochs that train the network: all but the controller-only ones at the end
        (``quant.controller_epochs``); the learning rate and temperature schedules span them."""
        return self.epochs - self.quant.controller_epochs

    @property
    def ref_bits(self) -> int:
        bits = sorted(self.quant.bits)
        return self.reference_bits or bits[len(bits) // 2]


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int promotes to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key {key!r}: {value!r} is not a {allowed}")
    if origin is dict:
        key_type, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {
            _coerce(k, key_type, key): _coerce(v, item, f"{key}[{k!r}]") for k, v in value.items()
        }
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) and key in YES_NO_KEYS:
            return "yes" if value else "no"
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"unknown config key {prefix + key!r}; allowed: {allowed}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=1", "data.limit=512"]`` to a nested dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A validated :class:`Config` from a plain dict plus ``key=value`` overrides."""
    data = _merge(data or {}, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return from_dict(data, overrides)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key!r}: {value!r} is not allowed; allowed: {allowed}")


def validate(cfg: Config) -> None:
    """Cross-field checks; the quantization spec itself is checked when the model is built."""
    from .quant.methods import METHODS

    _one_of("recipe", cfg.recipe, RECIPES)
    _one_of("data.name", cfg.data.name, DATASETS)
    _one_of("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _one_of("optim.name", cfg.optim.name, OPTIMIZERS)
    _one_of("budget.kind", cfg.budget.kind, BUDGET_KINDS)
    _one_of("data.cache", cfg.data.cache, ("auto", "yes", "no"))
    _one_of("device", cfg.device.split(":")[0], ("auto", "cpu", "cuda", "mps"))
    if cfg.recipe != "fp":
        _one_of("quant.method", cfg.quant.method, METHODS)
    bits = cfg.quant.bits
    if not bits:
        raise ConfigError("config key 'quant.bits' is empty; give at least one bit-width in 1..8")
    for b in bits:
        if not 1 <= b <= 8:
            raise ConfigError(f"config key 'quant.bits': {b} is outside the allowed range 1..8")
    if cfg.recipe == "static" and len(bits) != 1:
        raise ConfigError(f"recipe 'static' takes one bit-width in quant.bits, got {bits}")
    if cfg.epochs < 1:
        raise ConfigError(f"config key 'epochs': {cfg.epochs} must be >= 1")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"config key 'data.limit': {cfg.data.limit} must be >= 1")
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"config key 'data.{key}' must be >= 1")
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise ConfigError(
            f"config key 'data.image_size': {cfg.data.image_size} must be >= 1 "
            "(or null for the dataset's own size)"
        )
    if cfg.data.workers < 0:
        raise ConfigError(
            f"config key 'data.workers': {cfg.data.workers} must be >= 0 "
            "(0 loads in the main process)"
        )
    _one_of("distill.teacher", cfg.distill.teacher, DISTILL_TEACHERS)
    if (cfg.distill.teacher == "checkpoint") != bool(cfg.distill.checkpoint):
        raise ConfigError(
            "config keys 'distill.teacher' and 'distill.checkpoint': a checkpoint teacher "
            "needs distill.checkpoint (a run folder or .pt file), and only it takes one"
        )
    if cfg.distill.teacher != "none":
        if cfg.recipe == "fp":
            raise ConfigError("config key 'distill.teacher': an fp run has nothing to distil into")
        if cfg.distill.teacher == "fp" and not cfg.model.init:
            raise ConfigError(
                "config key 'distill.teacher': 'fp' distils from the model.init network; "
                "set model.init to a full-precision run"
            )
        if cfg.distill.teacher == "highest" and cfg.recipe != "dynamic":
            raise ConfigError(
                "config key 'distill.teacher': 'highest' needs recipe dynamic (candidates)"
            )
        if cfg.distill.weight < 0 or cfg.distill.temperature <= 0:
            raise ConfigError(
                "config keys 'distill.weight' (>= 0) and 'distill.temperature' (> 0): got "
                f"{cfg.distill.weight} and {cfg.distill.temperature}"
            )
    if cfg.budget.rank_weight < 0 or (cfg.budget.rank_weight > 0 and cfg.recipe != "dynamic"):
        raise ConfigError(
            f"config key 'budget.rank_weight': {cfg.budget.rank_weight} must be >= 0, and "
            "needs recipe dynamic (candidates to rank) when above 0"
        )
    if not 0 <= cfg.quant.random_epochs < cfg.epochs or (
        cfg.quant.random_epochs and cfg.recipe != "dynamic"
    ):
        raise ConfigError(
            f"config key 'quant.random_epochs': {cfg.quant.random_epochs} must be in "
            f"0..epochs-1 ({cfg.epochs - 1}), and needs recipe dynamic when above 0"
        )
    # The controller-only epochs come last, after the random-choice warm-up, and the network
    # trains in at least one epoch before them.
    most = min(cfg.epochs - 1, cfg.epochs - cfg.quant.random_epochs)
    if not 0 <= cfg.quant.controller_epochs <= most or (
        cfg.quant.controller_epochs and cfg.recipe != "dynamic"
    ):
        raise ConfigError(
            f"config key 'quant.controller_epochs': {cfg.quant.controller_epochs} must be in "
            f"0..{most} (after quant.random_epochs, with the network trained in at least one "
            "epoch), and needs recipe dynamic when above 0"
        )
    for key in ("product_bits", "weight_bits"):
        value = getattr(cfg.quant, key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8
        ):
            raise ConfigError(
                f"config key 'quant.{key}': {value!r} must be null or an integer 1..8"
            )
    if cfg.quant.layer_bits and cfg.recipe != "static":
        raise ConfigError(
            "config key 'quant.layer_bits' sets bits per layer of a static model; it needs "
            "recipe static (a DQ model chooses its own)"
        )
    for pattern, value in cfg.quant.layer_bits.items():
        if not 1 <= value <= 8:
            raise ConfigError(
                f"config key 'quant.layer_bits[{pattern!r}]': {value} is outside 1..8"
            )
    if cfg.quant.weight_bits is not None and cfg.quant.separate:
        raise ConfigError(
            "config keys 'quant.weight_bits' and 'quant.separate': fixed weights leave only "
            "activations to choose; set one of them"
        )
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr': {cfg.optim.lr} must be > 0")
    if cfg.reference_bits is not None and not 1 <= cfg.reference_bits <= 8:
        raise ConfigError(f"config key 'reference_bits': {cfg.reference_bits} is outside 1..8")
