"""Turn any Conv2d/Linear CNN into a dynamic (DQ) or static quantized model by module swap.

The user's model code is unchanged: a shape probe finds every Conv2d/Linear in
execution order, each is replaced by its quantized counterpart, and the bit
controller is attached by a forward hook on the tap module. Layers that run
before the tap has finished (its output feeds the controller) are quantized at a
fixed bit-width; every layer after it is dynamic.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .controller import BitController, annealed_tau, select
from .cost import (
    BITOPS_CONVENTION,
    Budget,
    LayerInfo,
    ProbeResult,
    Profile,
    controller_cost,
    probe,
    reference_bitops_at,
)
from .nn.attention import split_attention
from .nn.layers import EXECUTIONS, DynamicQConv2d, DynamicQLinear, QConv2d, QLinear
from .nn.product_quant import quantize_products
from .nn.routing import RoutePlan, choice_keys, plan_layers
from .nn.switchable_bn import find_following_bns, swap_switchable_bns
from .products import ProductInfo
from .quant.methods import METHODS, min_bits
from .taps import choose_tap

FIRST_LAST = ("fp", "8bit", "quantize")


def _check_bits(bits: tuple[int, ...], what: str) -> None:
    if len(bits) == 0:
        raise ValueError(f"{what} is empty; give at least one bit-width in 1..8")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"{what} contains {b!r}; allowed: integers 1..8")
    if len(set(bits)) != len(bits):
        raise ValueError(f"{what} {tuple(bits)} repeats a bit-width; give distinct values")


def _check_method(method: str, bits: tuple[int, ...]) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    low = min_bits(method, "weight")
    if min(bits) < low:
        raise ValueError(f"method {method!r} needs bits >= {low} for weights, got {min(bits)}")


@dataclass
class DynamicSpec:
    """Everything :func:`dynamic` needs to know. Validated on construction.

    Attributes:
        method (str, "pact"): the quantizer: dorefa, pact, lsq or lqnets.
        bits (tuple[int, ...], (3, 4, 5)): candidate bit-widths, sorted ascending.
        budget (Budget, Budget()): compute budget and the weight of its hinge regularizer.
        tap (str | None, None): module whose output (a feature map ``[B, C, H, W]`` or
            tokens ``[B, N, C]``) feeds the controller; None chooses it from the model: the
            earliest stage end with 15% of the MACs before it (``layer1`` of ResNets, see
            :mod:`instaquant.taps`).
        fixed_bits (int | None, None): bits of the quantized layers up to the tap; None
            takes the middle candidate.
        first_last (str, "fp"): ``fp`` keeps the first conv and the last linear full
            precision, ``8bit`` quantizes them at 8 bits, ``quantize`` treats them like any
            other layer.
        exclude (tuple[str, ...], ()): fnmatch patterns of layers kept full precision (one
            string is one pattern).
        separate (bool, False): weights and activations choose their bits separately.
        weight_bits (int | None, None): every quantized layer's weights at this one
            bit-width, so that ``bits``, ``fixed_bits`` and the budget's ``target_bits``
            name activation bits only and a layer's BitOPs grow linearly with its choice
            (layers pinned at 8 bits keep theirs); None: weights at the chosen bits too.
            Relative BitOPs stay relative to static b-bit with weights at b too.
        share (bool, False): one learned clip/step shared by all candidates of a layer.
        signed (dict[str, bool], {}): per-layer override of the signed-activation detection.
        hidden (int, 128): width of the controller's hidden layer.
        dropout (float, 0.1): dropout in the controller, in [0, 1).
        controller_norm (bool, True): standardize the controller's input features.
        controller_grid (int, 1): the tap averaged over a grid x grid layout of cells (1:
            global pooling); any input resolution works.
        controller_stats (bool, False): the controller also sees each tap channel's
            standard deviation and gradient energy (see :class:`BitController`).
        candidate_bn (bool, False): each BatchNorm that reads a dynamic conv's output keeps
            one copy (statistics and affine parameters) per candidate, and each image is
            normalized by the copy of its layer's choice (switchable BN; not with separate).
        tau (float, 1.0): Gumbel-Softmax temperature of training (and of sample_in_eval).
        tau_final (float | None, None): temperature that ``set_progress(1.0)`` anneals to;
            None keeps ``tau``.
        sample_in_eval (bool, False): Gumbel sampling also in evaluation (the official
            code's behaviour; the default is the deterministic argmax).
        execution (str, "fast"): ``fast`` routes each sample to its branch in evaluation and
            trains on the exact row-split path; ``reference`` runs the mixture of all
            branches as the paper's code does; ``graph`` selects each sample's candidate by
            indexing in evaluation (no host sync, exportable) and trains as ``fast``.
        product_bits (int | None, None): quantize the matrix products outside Conv2d/Linear
            layers (attention's q·kᵀ and attention·v) at this many bits, both operands, with
            ``method``'s activation quantizer; they are then counted in BitOPs as fixed-bit
            rows. None keeps them full precision, listed apart and outside BitOPs.
    """

    method: str = "pact"
    bits: tuple[int, ...] = (3, 4, 5)
    budget: Budget = field(default_factory=Budget)
    tap: str | None = None
    fixed_bits: int | None = None
    first_last: str = "fp"
    exclude: tuple[str, ...] = ()
    separate: bool = False
    weight_bits: int | None = None
    share: bool = False
    signed: dict[str, bool] = field(default_factory=dict)
    hidden: int = 128
    dropout: float = 0.1
    controller_norm: bool = True
    controller_grid: int = 1
    controller_stats: bool = False
    candidate_bn: bool = False
    tau: float = 1.0
    tau_final: float | None = None
    sample_in_eval: bool = False
    execution: str = "fast"
    product_bits: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, int):
            raise ValueError(f"bits must be a tuple of candidates, e.g. ({self.bits},); got an int")
        self.bits = tuple(sorted(self.bits))
        self.exclude = patterns(self.exclude)
        _check_bits(self.bits, "bits")
        _check_method(self.method, self.bits)
        if self.fixed_bits is None:
            self.fixed_bits = self.bits[len(self.bits) // 2]
        _check_bits((self.fixed_bits,), "fixed_bits")
        check_weight_bits(self.weight_bits, self.method)
        if self.weight_bits is not None and self.separate:
            raise ValueError(
                "weight_bits fixes the weights, so only activations choose; it does not "
                "combine with separate=True"
            )
        check_product_bits(self.product_bits, self.method)
        if self.first_last not in FIRST_LAST:
            raise ValueError(
                f"first_last {self.first_last!r} is not allowed; allowed: {', '.join(FIRST_LAST)}"
            )
        if self.execution not in EXECUTIONS:
            raise ValueError(
                f"execution {self.execution!r} is not allowed; allowed: {', '.join(EXECUTIONS)}"
            )
        check_temperature(self.tau, "tau")
        if self.tau_final is not None:
            check_temperature(self.tau_final, "tau_final")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        grid = self.controller_grid
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"controller_grid must be a positive integer, got {grid!r}")
        if self.candidate_bn and self.separate:
            raise ValueError(
                "candidate_bn needs one choice per layer; it does not combine with separate=True"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.budget, dict):
            self.budget = Budget(**self.budget)
        if not isinstance(self.budget, Budget):
            raise ValueError(
                f"budget must be an instaquant.Budget (or a dict of its fields), got "
                f"{type(self.budget).__name__}"
            )


def check_weight_bits(bits: int | None, method: str) -> None:
    if bits is not None:
        _check_bits((bits,), "weight_bits")
        _check_method(method, (bits,))


def check_product_bits(bits: int | None, method: str) -> None:
    if bits is None:
        return
    _check_bits((bits,), "product_bits")
    low = min_bits(method, "activation", signed=True)  # q, k and v are signed
    if bits < low:
        raise ValueError(f"method {method!r} needs product_bits >= {low}, got {bits}")


def patterns(exclude: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``exclude`` as a tuple of glob patterns (one string is one pattern, not its letters)."""
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)


def check_temperature(tau: float, what: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"{what} must be a finite number > 0, got {tau!r}")
    if tau <= 0:
        raise ValueError(f"{what} must be > 0, got {tau}")


@dataclass
class ForwardRecord:
    """What the latest forward chose and cost: ``bits_w``, ``bits_a`` ``[B, L]``, ``bitops`` ``[B]``.

    In training ``bitops`` is differentiable through the straight-through selection.
    ``selection`` is the one-hot ``[B, L, K]`` (``[B, L, 2, K]`` when separate) and
    ``logits`` the controller's output (None for static models).
    """

    bits_w: Tensor
    bits_a: Tensor
    bitops: Tensor
    selection: Tensor | None = None
    logits: Tensor | None = None


def cost_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BitOPs and mean bits are computed in: float64 for float64 work, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assign_roles(
    layers: list[LayerInfo],
    first_last: str,
    exclude: tuple[str, ...],
) -> None:
    """Mark layers fp / static / dynamic (dynamic ones are those after the tap)."""
    for info in layers:
        info.role = "static" if info.before_tap else "dynamic"
    if first_last != "quantize" and layers:
        first = next((i for i in layers if i.op == "conv"), layers[0])
        last = layers[-1]
        for info in {first.name: first, last.name: last}.values():
            info.role = "fp" if first_last == "fp" else "static"
            info.bits = (8,) if first_last == "8bit" else ()
            info.pinned_bits = 8 if first_last == "8bit" else None
    for info in layers:  # last: an excluded layer stays full precision whatever else applies
        names = (info.name, *info.aliases)  # a layer held under several names, by any of them
        if any(fnmatch.fnmatch(n, pat) for n in names for pat in exclude):
            info.role, info.bits, info.pinned_bits = "fp", (), None


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _check_plain(module: nn.Module, name: str) -> None:
    """A subclass of Conv2d/Linear with its own forward would lose it once quantized."""
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if type(module).forward is not base.forward:
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}, a {base.__name__} with its own "
            "forward, which a quantized layer would not run; leave it full precision with "
            f"exclude=[{name!r}]"
        )


def _swap(
    root: nn.Module, info: LayerInfo, method: str, bits: tuple[int, ...], signed: bool, **kw
) -> nn.Module:
    old = root.get_submodule(info.name)
    _check_plain(old, info.name)
    if info.role == "dynamic":
        cls = DynamicQConv2d if info.op == "conv" else DynamicQLinear
        new = cls.from_float(old, method, bits, signed, **kw)
    else:
        cls = QConv2d if info.op == "conv" else QLinear
        new = cls.from_float(old, method, bits[0], signed, **kw)
    new.train(old.training)
    # Every attribute holding the layer (the probe found them all) gets the quantized one,
    # so that whichever name the forward calls it by runs quantized.
    for name in (info.name, *info.aliases):
        _set_module(root, name, new)
    return new


class QuantModel(nn.Module):
    """Common part of dynamic and static quantized models: the layer plan and its cost."""

    layers: list[LayerInfo]
    last: ForwardRecord | None
    # One input's shape at conversion: the layers' MACs, hence every BitOPs figure, are
    # counted at this size.
    example_shape: tuple[int, ...] | None = None
    # Matrix products outside Conv2d/Linear (attention), full precision, found by the probe.
    products: list[ProductInfo] = []

    def warn_if_other_size(self, x: Tensor) -> None:
        """Say once that BitOPs stay those of the example's size when the input's differs."""
        shape = tuple(x.shape[1:])
        if self.example_shape in (None, shape) or self.__dict__.get("_size_warned"):
            return
        self.__dict__["_size_warned"] = True
        warnings.warn(
            f"input of shape {shape} but the model was converted with an example of shape "
            f"{self.example_shape}: its BitOPs (last.bitops, budget_loss, profiles) count "
            "the example's size; convert with an example of the size you run",
            stacklevel=5,  # past forward and nn.Module.__call__: the caller's line
        )

    def __getstate__(self) -> dict:
        # Copies and pickles leave out the latest forward's tensors (they may hold a graph).
        state = super().__getstate__()
        # Rebuilt on demand from the copy's own layers.
        state.pop("_dynamic_modules", None)
        state.pop("_candidate_bn_modules", None)
        return {**state, "last": None, "_pending": None}

    @property
    def quantized_layers(self) -> list[LayerInfo]:
        """The quantized Conv2d/Linear layers (not the rows of quantized products)."""
        return [i for i in self.layers if i.role != "fp" and i.op != "product"]

    @property
    def dynamic_layers(self) -> list[LayerInfo]:
        return [i for i in self.layers if i.role == "dynamic"]

    def static_bitops(self, bits: int) -> float:
        """BitOPs of the same layers quantized statically at ``bits``, weights and activations
        alike, fixed ``weight_bits`` or not: the reference of relative BitOPs."""
        return reference_bitops_at(self.layers, bits)

    @property
    def bitops_convention(self) -> str:
        return BITOPS_CONVENTION

    def describe_layers(self) -> Profile:
        return Profile(self.layers, products=self.products)


class DynamicQuantModel(QuantModel):
    """A backbone with per-sample, per-layer bit-widths chosen by a :class:`BitController`.

    ``forward(x)`` returns the backbone's logits; ``last`` records the choice and its cost;
    ``budget_loss()`` is the regularizer to add to the task loss.
    """

    tap_reason = "named by spec.tap"  # or why :func:`dynamic` chose ``spec.tap``

    def __init__(
        self,
        model: nn.Module,
        controller: BitController,
        spec: DynamicSpec,
        layers: list[LayerInfo],
        tap_shape: tuple[int, ...],
        candidate_bns: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.controller = controller
        self.spec = spec
        self.layers = layers
        self.tap_shape = tap_shape
        self.tau = spec.tau
        self.last = None
        self._forced: Tensor | None = None
        self._random = False
        self._pending: Tensor | None = None
        # Integer cost buffers: ``.half()`` and autocast leave them exact (MACs overflow fp16).
        self.register_buffer("candidate_bits", torch.tensor(spec.bits, dtype=torch.int64))
        weight_bits = (
            spec.bits if spec.weight_bits is None else (spec.weight_bits,) * len(spec.bits)
        )
        # Not saved: it follows from the spec, and checkpoints from before it still load.
        self.register_buffer(
            "candidate_weight_bits", torch.tensor(weight_bits, dtype=torch.int64), persistent=False
        )
        static_bitops = int(sum(i.bitops_at(i.bits[0]) for i in layers if i.role == "static"))
        self.register_buffer("static_part_bitops", torch.tensor(static_bitops, dtype=torch.int64))
        macs = [i.macs for i in layers if i.role == "dynamic"]
        self.register_buffer("dynamic_macs", torch.tensor(macs, dtype=torch.int64))
        self._dynamic_names = [i.name for i in layers if i.role == "dynamic"]
        # (dynamic layer index, BatchNorm path) of the per-candidate BatchNorms, if any.
        self._candidate_bns = [
            (self._dynamic_names.index(conv), bn) for bn, conv in (candidate_bns or {}).items()
        ]
        model.get_submodule(spec.tap).register_forward_hook(self._on_tap)

    # ---------------------------------------------------------------- selection
    def dynamic_modules(self) -> list[nn.Module]:
        # Resolved once: looking 12+ layers up by name twice per forward showed at batch 1.
        cached = self.__dict__.get("_dynamic_modules")
        if cached is None:
            cached = [self.model.get_submodule(n) for n in self._dynamic_names]
            self.__dict__["_dynamic_modules"] = cached
        return cached

    def candidate_bn_modules(self) -> list[tuple[int, nn.Module]]:
        """(dynamic layer index, switchable BatchNorm) pairs; empty without ``candidate_bn``."""
        cached = self.__dict__.get("_candidate_bn_modules")
        if cached is None:
            cached = [(i, self.model.get_submodule(n)) for i, n in self._candidate_bns]
            self.__dict__["_candidate_bn_modules"] = cached
        return cached

    def set_execution(self, execution: str) -> None:
        """How the dynamic layers run (see :class:`DynamicSpec`): ``fast``, ``reference`` or
        ``graph`` (candidates selected by indexing, for export)."""
        if execution not in EXECUTIONS:
            raise ValueError(
                f"execution {execution!r} is not allowed; allowed: {', '.join(EXECUTIONS)}"
            )
        self.spec.execution = execution
        for layer in self.dynamic_modules():
            layer.execution = execution
        for _, bn in self.candidate_bn_modules():
            bn.__dict__["indexed"] = execution == "graph"

    def set_random_choices(self, enabled: bool) -> None:
        """Any-precision warm-up: with ``enabled``, in training mode every image draws each
        layer's candidate uniformly at random and the controller is not run, so it gets no
        gradient; the shared weights learn to work at every candidate. Evaluation mode keeps
        the controller's choices."""
        self._random = bool(enabled)

    def train_controller_only(self) -> DynamicQuantModel:
        """Training mode for the controller alone: it samples its choices (Gumbel) and its own
        norm follows the batch, while the network runs as in evaluation (BatchNorm on its
        running statistics, LQ-Nets' bases fixed), so the controller learns the allocation of
        the network that inference runs. The network's parameters still need freezing, by
        the caller (``quant.controller_epochs`` gives them no learning rate)."""
        self.train()
        self.model.eval()
        self.controller.train()  # in case the network holds it
        return self

    def _on_tap(self, module: nn.Module, inputs: tuple, out: Tensor) -> None:
        if self._forced is not None:
            # .to(device): the model may have moved since forced_bits began (export's .cpu()).
            forced = self._forced.to(device=out.device, dtype=out.dtype)
            sel, logits = forced.expand(out.shape[0], *forced.shape), None
        elif self._random and self.training:
            K, shape = len(self.spec.bits), (out.shape[0], len(self._dynamic_names))
            shape += (2,) if self.spec.separate else ()
            index = torch.randint(K, shape, device=out.device)
            sel, logits = F.one_hot(index, K).to(out.dtype), None
        else:
            logits = self.controller(out)
            sel = select(logits, self.tau, self.training, self.spec.sample_in_eval)
        layers = self.dynamic_modules()
        # Only layers with fast execution route; a model of reference layers needs no plan.
        routes = (
            not self.training
            and not torch.is_grad_enabled()
            and any(m.execution == "fast" and not m.training for m in layers)
        )
        plans = self._route_plans(sel) if routes else None
        for i, layer in enumerate(layers):
            choice = (sel[:, i, 0], sel[:, i, 1]) if self.spec.separate else sel[:, i]
            layer.set_selection(choice, plans[i] if plans else None)
        bns = self.candidate_bn_modules()
        if bns:
            index = sel.argmax(-1)  # [B, L]
            for i, bn in bns:
                bn.set_selection(index[:, i])
        self._pending = (sel, logits)

    def _route_plans(self, sel: Tensor) -> list[RoutePlan]:
        """Every dynamic layer's routing for a no-grad forward, planned in one go."""
        K = len(self.spec.bits)
        if self.spec.separate:
            return plan_layers(*choice_keys(sel[:, :, 0], sel[:, :, 1], K))
        return plan_layers(*choice_keys(sel, None, K))

    @contextmanager
    def forced_bits(self, bits_w: list[int], bits_a: list[int] | None = None):
        """Run every sample at the given bits per dynamic layer instead of the controller's choice."""
        K = len(self.spec.bits)
        idx_w = self._candidate_indices(bits_w)
        idx_a = idx_w if bits_a is None else self._candidate_indices(bits_a)
        if len(idx_w) != len(self._dynamic_names) or len(idx_a) != len(idx_w):
            raise ValueError(f"give one bit-width per dynamic layer ({len(self._dynamic_names)})")
        if not self.spec.separate and idx_w != idx_a:
            raise ValueError("weight and activation bits differ but the spec chooses them jointly")
        eye = torch.eye(K, device=self.candidate_bits.device)
        forced = eye[idx_w]
        if self.spec.separate:
            forced = torch.stack([eye[idx_w], eye[idx_a]], dim=1)
        outer, self._forced = self._forced, forced
        try:
            yield self
        finally:
            self._forced = outer  # nested: the enclosing forced bits apply again

    def pin_forced_bits(self) -> None:
        """For export at fixed bits (inside :meth:`forced_bits`): every dynamic layer and
        candidate BatchNorm runs its forced candidate as a static layer would, so that a
        frozen copy keeps one quantized weight per layer and no per-sample indexing."""
        if self._forced is None:
            raise RuntimeError("pin_forced_bits runs inside forced_bits")
        index = self._forced.argmax(-1)  # [L] or, with separate bits, [L, 2]
        for i, layer in enumerate(self.dynamic_modules()):
            k_w, k_a = index[i].tolist() if self.spec.separate else [int(index[i])] * 2
            layer.pin(k_w, k_a)
        for i, bn in self.candidate_bn_modules():  # one choice per layer (no separate bits)
            bn.pin(int(index[i]))

    def _candidate_indices(self, bits: list[int]) -> list[int]:
        """Candidate indices of bit-widths given as numbers (ints, or whole floats such as
        the values of ``last.bits_w``); anything else is refused, not rounded."""
        found, wrong = [], []
        for b in bits:
            value = None if isinstance(b, (bool, str)) else float(b)
            if value is None or not value.is_integer() or int(value) not in self.spec.bits:
                wrong.append(b)
            else:
                found.append(self.spec.bits.index(int(value)))
        if wrong:
            raise ValueError(
                f"forced bits hold {wrong} outside the candidates; "
                f"allowed: {', '.join(map(str, self.spec.bits))}"
            )
        return found

    # ---------------------------------------------------------------- forward
    def warn_if_unrouted_eval(self) -> None:
        """Say once that evaluation with autograd on computes every candidate's branch."""
        if self.training or not torch.is_grad_enabled() or self.__dict__.get("_eval_warned"):
            return
        if not any(p.requires_grad for p in self.parameters()):
            return  # frozen: no gradient to keep, the layers route on their own
        self.__dict__["_eval_warned"] = True
        warnings.warn(
            "evaluation with autograd enabled runs every candidate's branch of each dynamic "
            f"layer (about {len(self.spec.bits)}x the compute) so that gradients stay exact; "
            "run it under torch.no_grad() or torch.inference_mode() to send each image "
            "through its chosen branch only",
            stacklevel=3,
        )

    def forward(self, x: Tensor) -> Tensor:
        self.warn_if_other_size(x)
        self.warn_if_unrouted_eval()
        self._pending = None
        self.last = None  # a forward that raises leaves no stale record of an earlier batch
        try:
            out = self.model(x)
        finally:
            for layer in self.dynamic_modules():
                layer.set_selection(None)
            for _, bn in self.candidate_bn_modules():
                bn.set_selection(None)
        if self._pending is None:
            raise RuntimeError(f"the tap module {self.spec.tap!r} did not run in this forward")
        sel, logits = self._pending
        self._pending = None
        self.last = self._record(sel, logits)
        return out

    def _record(self, sel: Tensor, logits: Tensor | None) -> ForwardRecord:
        # At least float32, and by elementwise ops (which autocast leaves alone): BitOPs of
        # 1e8 and more are inf in float16 and coarse in bfloat16.
        sel = sel.to(cost_dtype(sel.dtype))
        bits_w, bits_a, bitops = self._cost_of(sel)
        return ForwardRecord(bits_w, bits_a, bitops, sel, logits)

    def _cost_of(self, dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean weight and activation bits ``[B, L]`` and BitOPs ``[B]`` of choices given as a
        distribution over the candidates (one-hot: the choice itself)."""
        b = self.candidate_bits.to(dist.dtype)
        if self.spec.separate:
            bits_w, bits_a = (dist[:, :, 0] * b).sum(-1), (dist[:, :, 1] * b).sum(-1)
            per_layer = bits_w * bits_a
        else:
            b_w = self.candidate_weight_bits.to(dist.dtype)  # b itself unless weights are fixed
            bits_w, bits_a = (dist * b_w).sum(-1), (dist * b).sum(-1)
            per_layer = (dist * (b_w * b)).sum(-1)  # linear in the one-hot: clean STE gradient
        macs = self.dynamic_macs.to(dist.dtype)
        return bits_w, bits_a, (per_layer * macs).sum(-1) + self.static_part_bitops.to(dist.dtype)

    def expected_bitops(self) -> Tensor | None:
        """Per-image BitOPs ``[B]`` the latest forward's controller expects: each layer's cost
        averaged over ``softmax(logits / tau)``, the distribution training samples from. Unlike
        ``last.bitops`` it is smooth in the logits; None when the controller did not run
        (forced or random choices)."""
        rec = self.last
        if rec is None or rec.logits is None:
            return None
        probs = torch.softmax(rec.logits.to(cost_dtype(rec.logits.dtype)) / self.tau, dim=-1)
        return self._cost_of(probs)[2]

    def set_temperature(self, tau: float) -> None:
        check_temperature(tau, "tau")
        self.tau = float(tau)

    def set_progress(self, progress: float) -> None:
        """Anneal the Gumbel temperature from ``spec.tau`` to ``spec.tau_final`` as training
        ``progress`` goes 0 → 1 (call it each epoch with ``epoch / (epochs - 1)``); nothing
        changes when ``tau_final`` is unset."""
        if self.spec.tau_final is not None:
            self.set_temperature(annealed_tau(self.spec.tau, self.spec.tau_final, progress))

    def budget_loss(self) -> Tensor:
        """``weight · max(0, cost − target)`` for the latest forward (see :class:`Budget`)."""
        if self.last is None:
            raise RuntimeError("budget_loss() needs a forward pass first")
        rec = self.last
        if self.spec.weight_bits is None:
            mean_bits = (rec.bits_w.mean() + rec.bits_a.mean()) / 2
        else:  # fixed weights: the chosen bits are the activations' alone
            mean_bits = rec.bits_a.mean()
        return self.spec.budget.loss(rec.bitops, mean_bits, self.layers)

    def budget_target(self) -> float:
        return self.spec.budget.target(self.layers)

    def describe_layers(self) -> Profile:
        macs, params = controller_cost(self.controller, self.tap_shape)
        tap = f"{self.spec.tap} ({self.tap_reason})"
        return Profile(self.layers, macs, params, products=self.products, tap=tap)

    def extra_repr(self) -> str:
        return f"tap={self.spec.tap!r}: {self.tap_reason}"


class StaticQuantModel(QuantModel):
    """A backbone quantized at one fixed bit-width; ``last`` records the (constant) cost."""

    def __init__(self, model: nn.Module, layers: list[LayerInfo], bits: int, method: str) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.bits = bits
        self.method = method
        self.last = None
        bitops = sum(i.bitops_at(i.bits[0]) for i in layers if i.role != "fp")
        # Integers, as in DynamicQuantModel: exact whatever dtype the model is cast to.
        self.register_buffer("bitops_per_sample", torch.tensor(int(bitops), dtype=torch.int64))
        layer_bits = [i.bits[0] for i in self.quantized_layers]
        self.register_buffer("layer_bits", torch.tensor(layer_bits, dtype=torch.int64))
        weight_bits = [i.weight_bits or i.bits[0] for i in self.quantized_layers]
        self.register_buffer(  # not saved: it follows from the plan (older checkpoints load)
            "layer_weight_bits", torch.tensor(weight_bits, dtype=torch.int64), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        self.warn_if_other_size(x)
        self.last = None
        out = self.model(x)
        B, dtype = x.shape[0], cost_dtype(x.dtype)
        bits_a = self.layer_bits.to(dtype).expand(B, -1)
        bits_w = self.layer_weight_bits.to(dtype).expand(B, -1)
        self.last = ForwardRecord(bits_w, bits_a, self.bitops_per_sample.to(dtype).expand(B))
        return out

    def budget_loss(self) -> Tensor:
        return torch.zeros((), device=self.bitops_per_sample.device)


def _plan(
    model: nn.Module,
    example_input: Tensor,
    tap: str | None,
    first_last: str,
    exclude: tuple[str, ...],
    product_bits: int | None = None,
) -> ProbeResult:
    result = probe(model, example_input, tap)
    if not result.layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    names = [n for i in result.layers for n in (i.name, *i.aliases)]
    for pat in exclude:  # a typo would otherwise quantize the layer it meant to keep
        if not fnmatch.filter(names, pat):
            raise ValueError(
                f"exclude pattern {pat!r} matches no Conv2d/Linear layer; layers are named "
                f"like {', '.join(names[:3])}, ..."
            )
    _assign_roles(result.layers, first_last, exclude)
    if product_bits is not None:
        result.layers += _product_rows(result.products, product_bits, len(result.layers))
    return result


def _product_rows(products: list[ProductInfo], bits: int, start: int) -> list[LayerInfo]:
    """Quantized products as fixed-bit rows of the layer plan, so every BitOPs figure
    (budget target, static reference, per-image cost) counts them."""
    if not products:
        raise ValueError(
            "product_bits is set but the model runs no matrix product outside its Conv2d/"
            "Linear layers (such as attention's); leave product_bits None"
        )
    return [
        LayerInfo(
            name=f"{p.name or '(model)'} (products)",
            op="product",
            in_shape=(),
            out_shape=(),
            macs=p.macs,
            params=0,
            input_negative=False,
            order=start + i,
            role="static",
            bits=(bits,),
            pinned_bits=bits,
        )
        for i, p in enumerate(products)
    ]


def dynamic(model: nn.Module, spec: DynamicSpec, example_input: Tensor) -> DynamicQuantModel:
    """A DQ model from ``model`` (a deep copy; the original is left untouched).

    ``example_input`` (any batch size, on the model's device) drives the shape probe.
    """
    if not isinstance(spec, DynamicSpec):
        raise TypeError("spec must be an instaquant.DynamicSpec")
    model = copy.deepcopy(model)
    split_attention(model)  # its projections become Linear modules, which quantize
    spec = copy.deepcopy(spec)
    if spec.tap is None:
        choice = choose_tap(model, example_input)
        spec.tap, tap_reason = choice.name, choice.reason
    else:
        tap_reason = "named by spec.tap"
    planned = _plan(
        model, example_input, spec.tap, spec.first_last, spec.exclude, spec.product_bits
    )
    layers, tap_shape = planned.layers, planned.tap_shape
    if not any(i.role == "dynamic" for i in layers):
        raise ValueError(
            f"no quantizable layer runs after the tap {spec.tap!r}; pick an earlier tap"
        )
    unknown = set(spec.signed) - {i.name for i in layers}
    if unknown:
        raise ValueError(f"spec.signed names unknown layers: {', '.join(sorted(unknown))}")
    bn_pairs: dict[str, str] = {}
    if spec.candidate_bn:  # found on the float model: the dynamic layers run only in their model
        names = [i.name for i in layers if i.role == "dynamic"]
        bn_pairs = find_following_bns(model, example_input, names)
    for info in layers:
        if info.role == "fp" or info.op == "product":
            continue
        if info.role == "dynamic":
            info.bits = spec.bits
        elif not info.bits:
            info.bits = (spec.fixed_bits,)
        if info.pinned_bits is None:
            info.weight_bits = spec.weight_bits
        signed = spec.signed.get(info.name, info.input_negative)
        info.input_negative = signed
        kw = {"share": spec.share, "weight_bits": info.weight_bits}
        if info.role == "dynamic":
            kw["execution"] = spec.execution
        _swap(model, info, spec.method, info.bits, signed, **kw)
    if spec.budget.kind == "bitops":
        cheapest = _bitops_with(layers, spec.bits[0])
        if spec.budget.target(layers) < cheapest:
            raise ValueError(
                f"budget target {spec.budget.target(layers):.4g} BitOPs is below the cheapest "
                f"choice ({cheapest:.4g}, every dynamic layer at {spec.bits[0]} bits): infeasible"
            )
    elif spec.budget.target_bits < spec.bits[0]:
        raise ValueError(
            f"budget target {spec.budget.target_bits} bits is below the cheapest candidate "
            f"{spec.bits[0]}: infeasible"
        )
    _warn_if_never_binding(spec, layers)
    swap_switchable_bns(model, bn_pairs, len(spec.bits))
    if spec.product_bits is not None:  # after the swaps: the quantized layers pause it
        quantize_products(model, planned.products, spec.method, spec.product_bits)
    controller = BitController(
        _tap_channels(spec.tap, tap_shape),
        num_layers=sum(i.role == "dynamic" for i in layers),
        num_candidates=len(spec.bits),
        hidden=spec.hidden,
        dropout=spec.dropout,
        separate=spec.separate,
        normalize=spec.controller_norm,
        grid=spec.controller_grid,
        stats=spec.controller_stats,
        tokens=len(tap_shape) == 2,
    )
    first = next(model.parameters())
    controller.to(dtype=first.dtype)  # the backbone's dtype, so its features feed it directly
    result = DynamicQuantModel(model, controller, spec, layers, tap_shape, bn_pairs)
    result.to(first.device)
    result.example_shape = tuple(example_input.shape[1:])
    result.products = [] if spec.product_bits else planned.products  # else rows of the plan
    result.tap_reason = tap_reason
    result.set_execution(spec.execution)  # the candidate BatchNorms follow the layers
    return result


def _tap_channels(tap: str, shape: tuple[int, ...]) -> int:
    """C of a feature-map tap ``[C, H, W]`` or a token tap ``[N, C]`` (per-sample shapes)."""
    if len(shape) == 3:
        return shape[0]
    if len(shape) == 2 and shape[0] >= 2:
        return shape[1]
    raise ValueError(
        f"tap module {tap!r} outputs per-sample shape {tuple(shape)}; the controller reads a "
        "feature map [B, C, H, W] or at least two tokens [B, N, C]"
    )


def _bitops_with(layers: list[LayerInfo], dynamic_bits: int) -> float:
    """BitOPs with every dynamic layer at ``dynamic_bits`` and the static ones at theirs."""
    return sum(
        i.bitops_at(dynamic_bits if i.role == "dynamic" else i.bits[0])
        for i in layers
        if i.role in ("static", "dynamic")
    )


def _warn_if_never_binding(spec: DynamicSpec, layers: list[LayerInfo]) -> None:
    """A budget at or above the most expensive choice constrains nothing: say so once."""
    if spec.budget.kind == "bitops":
        costliest = _bitops_with(layers, spec.bits[-1])
        target, what = spec.budget.target(layers), "BitOPs"
    else:
        costliest, target, what = spec.bits[-1], spec.budget.target_bits, "bits"
    if target >= costliest:
        warnings.warn(
            f"budget target {target:.4g} {what} is at or above the most expensive choice "
            f"({costliest:.4g}, every dynamic layer at {spec.bits[-1]} bits): the budget never "
            "binds; lower the target or add a higher candidate",
            stacklevel=3,
        )


def static(
    model: nn.Module,
    method: str,
    bits: int,
    example_input: Tensor,
    first_last: str = "fp",
    exclude: tuple[str, ...] = (),
    share: bool = False,
    signed: dict[str, bool] | None = None,
    product_bits: int | None = None,
    weight_bits: int | None = None,
    layer_bits: dict[str, int] | None = None,
) -> StaticQuantModel:
    """The fixed-bit baseline with the same full-precision/quantized layer choices as :func:`dynamic`.

    Args:
        model (nn.Module): the full-precision network (a deep copy is converted).
        method (str): the quantizer: dorefa, pact, lsq or lqnets.
        bits (int): the one bit-width of every quantized layer, 1..8.
        example_input (Tensor): one batch of the input size, for the shape probe; BitOPs are
            counted at its size.
        first_last (str, "fp"): ``fp``, ``8bit`` or ``quantize``, as in :class:`DynamicSpec`.
        exclude (tuple[str, ...], ()): fnmatch patterns of layers kept full precision.
        share (bool, False): kept for symmetry with :class:`DynamicSpec` (one candidate).
        signed (dict[str, bool] | None, None): per-layer override of the signed-activation
            detection.
        product_bits (int | None, None): bits of the matrix products outside Conv2d/Linear
            layers (attention), as in :class:`DynamicSpec`; None keeps them full precision.
        weight_bits (int | None, None): weights at this many bits and activations at
            ``bits`` (W4A3: ``bits=3, weight_bits=4``), as in :class:`DynamicSpec`; None:
            both at ``bits``.
        layer_bits (dict[str, int] | None, None): mixed precision: fnmatch patterns of layer
            names to the bit-width of the layers they match (the first matching pattern wins;
            activation bits only when ``weight_bits`` fixes the weights); every other
            quantized layer at ``bits``. A DQ model's layer policy given as static layers.
    """
    _check_bits((bits,), "bits")
    _check_method(method, (bits,))
    check_weight_bits(weight_bits, method)
    check_product_bits(product_bits, method)
    if first_last not in FIRST_LAST:
        raise ValueError(
            f"first_last {first_last!r} is not allowed; allowed: {', '.join(FIRST_LAST)}"
        )
    model = copy.deepcopy(model)
    split_attention(model)
    planned = _plan(model, example_input, None, first_last, patterns(exclude), product_bits)
    layers = planned.layers
    signed = signed or {}
    unknown = set(signed) - {i.name for i in layers}
    if unknown:
        raise ValueError(f"signed names unknown layers: {', '.join(sorted(unknown))}")
    chosen = bits_per_layer(layers, bits, layer_bits or {}, method)
    for info in layers:
        if info.role == "fp" or info.op == "product":
            continue
        info.role = "static"
        info.bits = info.bits or (chosen[info.name],)
        if info.pinned_bits is None:
            info.weight_bits = weight_bits
        info.input_negative = signed.get(info.name, info.input_negative)
        kw = {"share": share, "weight_bits": info.weight_bits}
        _swap(model, info, method, info.bits, info.input_negative, **kw)
    if product_bits is not None:
        quantize_products(model, planned.products, method, product_bits)
    result = StaticQuantModel(model, layers, bits, method)
    result.example_shape = tuple(example_input.shape[1:])
    result.products = [] if product_bits else planned.products
    # What iq.save needs to convert the same backbone again (plain types).
    result.conversion = {
        "method": method,
        "bits": int(bits),
        "first_last": first_last,
        "exclude": list(exclude),
        "share": bool(share),
        "product_bits": product_bits,
        "weight_bits": weight_bits,
        "layer_bits": dict(layer_bits or {}),
    }
    return result


def bits_per_layer(
    layers: list[LayerInfo], bits: int, layer_bits: dict[str, int], method: str
) -> dict[str, int]:
    """The bit-width of every quantized layer of a static model that is not pinned: the first
    pattern of ``layer_bits`` that matches one of its names, else ``bits``. Pinned layers keep
    their 8 bits (``"*"`` passes them by); a pattern that matches no other quantized layer is
    refused, as a typo would otherwise leave the model at ``bits``."""
    quantized = [i for i in layers if i.role != "fp" and i.op != "product"]
    names = {i.name: (i.name, *i.aliases) for i in quantized if i.pinned_bits is None}
    pinned = {i.name: (i.name, *i.aliases) for i in quantized if i.pinned_bits is not None}

    def matching(pattern: str, table: dict[str, tuple[str, ...]]) -> list[str]:
        return [k for k, all_names in table.items() if fnmatch.filter(all_names, pattern)]

    for pattern, b in layer_bits.items():
        _check_bits((b,), f"layer_bits[{pattern!r}]")
        _check_method(method, (b,))
        if matching(pattern, names):
            continue
        only_pinned = matching(pattern, pinned)
        if only_pinned:
            raise ValueError(
                f"layer_bits pattern {pattern!r} names only {', '.join(only_pinned)}, "
                "pinned at 8 bits (first_last='8bit'); pinned layers keep their bits"
            )
        shown = ", ".join(list(names)[:3])
        raise ValueError(
            f"layer_bits pattern {pattern!r} matches no quantized layer (full-precision and "
            f"pinned layers keep their bits); quantized layers are named like {shown}, ..."
        )
    chosen = {}
    for name, all_names in names.items():
        match = next((p for p in layer_bits if fnmatch.filter(all_names, p)), None)
        chosen[name] = bits if match is None else layer_bits[match]
    return chosen
