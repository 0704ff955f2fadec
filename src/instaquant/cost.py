"""Compute cost: MACs per layer from a shape probe, per-sample BitOPs, budgets and the regularizer.

Convention: BitOPs ``= Σ MACs · b_w · b_a`` over the *quantized* layers (static and
dynamic). Full-precision layers (by default the first conv and the last linear)
are not counted in BitOPs; their MACs are reported separately. Quantized matrix products
(``product_bits``) are rows of the plan with fixed bits, counted like a static layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .products import ProductCounter, ProductInfo

BITOPS_CONVENTION = (
    "BitOPs = sum over quantized layers of MACs * weight bits * activation bits; "
    "full-precision layers are not counted, nor matrix products outside layers such as "
    "attention's unless product_bits quantizes them (MACs * product_bits^2); uncounted MACs "
    "are listed separately"
)
BUDGET_KINDS = ("bitops", "bits")


def reference_label(ref_bits: int, weight_bits: int | None = None) -> str:
    """The static model that relative BitOPs count against: ``static 3-bit``, or ``static
    W2A2`` when the run's weights are fixed (``weight_bits``), since the reference's are not."""
    b = ref_bits
    return f"static {b}-bit" if weight_bits is None else f"static W{b}A{b}"


@dataclass
class LayerInfo:
    """One Conv2d/Linear as seen by the shape probe (MACs and params per sample)."""

    name: str
    op: str  # "conv" or "linear"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    params: int
    input_negative: bool
    order: int
    before_tap: bool = False
    role: str = "dynamic"  # "fp", "static" or "dynamic"
    bits: tuple[int, ...] = ()
    pinned_bits: int | None = None  # fixed whatever the reference (first/last layer at 8 bits)
    aliases: tuple[str, ...] = ()  # other attribute paths holding the same module
    weight_bits: int | None = None  # weights fixed at these bits; None: as the activations

    def bitops_at(self, bits: float) -> float:
        """MACs · weight bits · activation bits with the activations at ``bits`` (the weights
        too unless ``weight_bits`` fixes them); a layer with pinned bits at its own."""
        if self.pinned_bits is not None:
            return float(self.macs * self.pinned_bits**2)
        weight = bits if self.weight_bits is None else self.weight_bits
        return float(self.macs * weight * bits)


@dataclass
class ProbeResult:
    layers: list[LayerInfo]
    tap_shape: tuple[int, ...] | None = None
    products: list[ProductInfo] = field(default_factory=list)


def layer_macs(module: nn.Module, out: Tensor) -> int:
    """MACs per sample of a Conv2d or Linear call that returned ``out``."""
    per_sample_out = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample_out * (module.in_channels // module.groups) * kh * kw
    return per_sample_out * module.in_features


def forward_with_hooks(model: nn.Module, example_input: Tensor, handles: list) -> None:
    """One forward of ``example_input`` in eval mode without autograd, for the hooks behind
    ``handles``; afterwards the hooks are removed and the mode restored, whatever happened."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def probe(model: nn.Module, example_input: Tensor, tap: str | None = None) -> ProbeResult:
    """Run ``example_input`` once (eval mode, no grad) and describe every Conv2d/Linear.

    Layers are listed in execution order; ``before_tap`` marks those that ran before
    the ``tap`` module finished. ``input_negative`` records whether the layer's input
    held negative values, which selects a signed activation quantizer.
    """
    infos: dict[str, LayerInfo] = {}
    order: list[str] = []
    tap_shape: list[tuple[int, ...]] = []
    handles = []
    modules = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    if tap is not None:
        try:
            tap_module = model.get_submodule(tap)  # any of its names, if it has several
        except AttributeError:
            raise ValueError(f"tap module {tap!r} not found in the model") from None

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            if name in infos:
                raise ValueError(
                    f"layer {name!r} runs twice in one forward; shared layers are not supported"
                )
            x = inputs[0]
            infos[name] = LayerInfo(
                name=name,
                op="conv" if isinstance(module, nn.Conv2d) else "linear",
                in_shape=tuple(x.shape[1:]),
                out_shape=tuple(out.shape[1:]),
                macs=layer_macs(module, out),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                input_negative=bool((x < 0).any()),
                order=len(order),
                before_tap=not tap_shape and tap is not None,
                aliases=tuple(n for n in names_of[id(module)] if n != name),
            )
            order.append(name)

        return hook

    def tap_hook(module: nn.Module, inputs: tuple, out: Tensor) -> None:
        if tap_shape:  # the controller would run again and re-choose mid-forward
            raise ValueError(
                f"tap module {tap!r} runs more than once in a forward; tap a module that runs "
                "once (e.g. a whole block instead of a shared activation inside it)"
            )
        tap_shape.append(tuple(out.shape[1:]))

    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook_for(name)))
    if tap is not None:
        handles.append(tap_module.register_forward_hook(tap_hook))
    with ProductCounter(model) as counter:
        forward_with_hooks(model, example_input, handles)
    if tap is not None and not tap_shape:
        raise ValueError(f"tap module {tap!r} did not run in the forward pass")
    layers = [infos[n] for n in order]
    return ProbeResult(layers, tap_shape[0] if tap_shape else None, counter.products)


def bitops_at(layers: list[LayerInfo], bits: float) -> float:
    """BitOPs of the quantized layers (roles static/dynamic) at ``bits`` for inputs and weights
    (weights at their fixed ``weight_bits`` where set), layers with pinned bits
    (``first_last="8bit"``) at theirs: a static model's own BitOPs."""
    return float(sum(info.bitops_at(bits) for info in layers if info.role != "fp"))


def reference_bitops_at(layers: list[LayerInfo], bits: int) -> float:
    """BitOPs of the same layers quantized statically at ``bits`` for weights and activations
    alike (pinned layers at theirs): the static reference that relative BitOPs are given
    against, the same whether or not ``weight_bits`` fixes these layers' weights."""
    joint = [replace(info, weight_bits=None) for info in layers]
    return bitops_at(joint, bits)


@dataclass
class Budget:
    """Compute budget and its hinge regularizer ``weight · max(0, cost − target)``.

    ``kind="bitops"`` (paper): cost is the batch-mean BitOPs relative to the target,
    the target being the static model at ``target_bits`` or ``target_bitops`` absolute.
    ``kind="bits"`` (official code): cost is the mean chosen bit-width, target ``target_bits``.
    """

    kind: str = "bitops"
    target_bits: float | None = 4.0
    target_bitops: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget.kind {self.kind!r} is not allowed; allowed: bitops, bits")
        for name in ("target_bits", "target_bitops", "weight"):
            value = getattr(self, name)
            if value is None and name != "weight":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"budget.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"budget.{name} must be finite, got {value}")
        if self.target_bitops is not None and self.kind == "bitops":
            self.target_bits = None
        if (self.target_bits is None) == (self.target_bitops is None):
            raise ValueError("budget needs exactly one of target_bits or target_bitops")
        if self.kind == "bits" and self.target_bits is None:
            raise ValueError("budget.kind 'bits' needs target_bits")
        if self.target_bits is not None and not 1 <= self.target_bits <= 8:
            raise ValueError(f"budget.target_bits {self.target_bits} is outside 1..8")
        if self.target_bitops is not None and self.target_bitops <= 0:
            raise ValueError(f"budget.target_bitops must be > 0, got {self.target_bitops}")
        if self.weight < 0:
            raise ValueError(f"budget.weight must be >= 0, got {self.weight}")

    def target(self, layers: list[LayerInfo]) -> float:
        """The absolute BitOPs target for ``layers`` (kind ``bitops``)."""
        if self.target_bitops is not None:
            return float(self.target_bitops)
        return bitops_at(layers, float(self.target_bits))

    def loss(self, bitops: Tensor, mean_bits: Tensor, layers: list[LayerInfo]) -> Tensor:
        """The hinge on the batch: ``bitops [B]``, ``mean_bits`` a scalar."""
        if self.kind == "bits":
            excess = mean_bits - self.target_bits
        else:
            excess = bitops.mean() / self.target(layers) - 1.0
        return self.weight * torch.relu(excess)


@dataclass
class Profile:
    """Per-layer cost table of a model (see :func:`profile`)."""

    layers: list[LayerInfo]
    controller_macs: int = 0
    controller_params: int = 0
    products: list[ProductInfo] = field(default_factory=list)  # full precision, not BitOPs
    tap: str | None = None  # the controller's tap module and why it was chosen
    convention: str = BITOPS_CONVENTION

    def reference_bitops(self, bits: int) -> float:
        """The static ``bits``-bit reference of these layers (:func:`reference_bitops_at`)."""
        return reference_bitops_at(self.layers, bits)

    def to_table(self) -> str:
        head = f"{'layer':<32} {'kind':<8} {'MACs':>12} {'params':>10}  bits"
        lines = [head, "-" * len(head)]
        for info in self.layers:
            bits = ",".join(map(str, info.bits)) if info.bits else "32 (fp)"
            if info.weight_bits is not None and info.pinned_bits is None:
                bits += f" (weights {info.weight_bits})"
            lines.append(
                f"{info.name:<32} {info.role:<8} {info.macs:>12,} {info.params:>10,}  {bits}"
            )
        for p in self.products:
            lines.append(f"{p.name + ' (products)':<32} {'fp':<8} {p.macs:>12,} {0:>10,}  32 (fp)")
        products = sum(p.macs for p in self.products)
        total = sum(i.macs for i in self.layers) + products
        fp = sum(i.macs for i in self.layers if i.role == "fp") + products
        lines.append("-" * len(head))
        lines.append(f"total MACs {total:,} (full precision {fp:,}, quantized {total - fp:,})")
        if self.controller_params:
            lines.append(
                f"bit controller: {self.controller_macs:,} MACs, {self.controller_params:,} params"
            )
        if self.tap:
            lines.append(f"bit controller reads {self.tap}")
        lines.append(self.convention)
        return "\n".join(lines)


def controller_cost(controller: nn.Module, tap_shape: tuple[int, ...]) -> tuple[int, int]:
    """MACs (pooling and input statistics counted as adds per input element) and params of
    the controller."""
    per_element = getattr(controller, "ops_per_input_element", 1)
    # Pooling a feature map [C, H, W] or averaging tokens [N, C]: one add per element.
    pool = int(torch.tensor(tap_shape).prod()) * per_element if len(tap_shape) in (2, 3) else 0
    macs = pool + sum(
        m.in_features * m.out_features for m in controller.modules() if isinstance(m, nn.Linear)
    )
    params = sum(p.numel() for p in controller.parameters())
    return macs, params


def profile(model: nn.Module, example_input: Tensor) -> Profile:
    """Per-layer table: name, kind (fp/static/dynamic), MACs, params, candidate bits.

    Works on a plain model (every layer listed as fp) and on the models returned by
    :func:`instaquant.dynamic` / :func:`instaquant.static`, which also report the
    bit controller's own MACs and params.
    """
    describe = getattr(model, "describe_layers", None)
    if describe is not None:
        shape = getattr(model, "example_shape", None)
        if shape is not None and tuple(example_input.shape[1:]) != shape:
            raise ValueError(
                f"the model's costs were counted at its conversion example's shape {shape}, "
                f"not {tuple(example_input.shape[1:])}; convert with an example of that size"
            )
        return describe()
    inner = next((m for m in model.modules() if hasattr(m, "describe_layers")), None)
    if inner is not None:  # its layers would be probed as plain fp layers
        raise ValueError(
            f"profile the quantized model itself (a {type(inner).__name__} inside this "
            f"{type(model).__name__}), not a module that wraps it"
        )
    result = probe(model, example_input)
    for info in result.layers:
        info.role = "fp"
    return Profile(result.layers, products=result.products)
