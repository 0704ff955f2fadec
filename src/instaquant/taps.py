"""Choosing the bit controller's tap from the model itself, when the spec names none.

A tap must be a *cut* of the forward: once it has run, nothing after it reads any
earlier tensor but its output (a module inside a residual block is not one: the
block's input is still waiting for the addition). One traced forward of the example
records every tensor operation; the cuts follow from when each tensor is last read.

Among the cuts, the candidates are the ends of stages:

- feature maps ``[B, C, H, W]``: the last cut at each resolution, not counting cuts
  inside a block that takes that resolution down (the expand convolution of a
  stride-2 inverted residual is a cut, but the stage ended before that block);
- tokens ``[B, N, C]``: every cut (each transformer block's end).

The tap is the first candidate by which :data:`TAP_MACS_SHARE` of the network's MACs
have run, so the controller reads features past the stem while most of the compute
stays dynamic: ``layer1`` of ResNets (CIFAR and ImageNet), ``features.3`` of
MobileNetV2, ``blocks.1`` of EfficientNet-B0, ``s2`` of RegNetY-200MF, ``stages.0`` of
ConvNeXt, the second block of a ViT-Ti.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .cost import forward_with_hooks, layer_macs

# The tap is the first stage end by which this share of the MACs has run.
TAP_MACS_SHARE = 0.15
# Reads that look at a tensor's metadata only: they do not keep its values alive.
_METADATA = {"size", "dim", "shape", "dtype", "device", "numel", "is_floating_point", "__get__"}


@dataclass
class Cut:
    """A module after which the forward reads only its output."""

    name: str
    shape: tuple[int, ...]  # per-sample output shape
    macs_share: float  # share of the network's Conv2d/Linear MACs run up to here
    stage_end: bool = False

    @property
    def kind(self) -> str:
        return "tokens" if len(self.shape) == 2 else "feature map"


@dataclass
class TapChoice:
    name: str
    reason: str
    candidates: list[Cut]


class _Trace(TorchFunctionMode):
    """Every tensor operation of a forward: which tensors it reads and writes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.produced: dict[int, int] = {}  # tensor id -> op index that (last) wrote it
        self.last_read: dict[int, int] = {}  # tensor id -> op index that last read it
        self.keep: list[Tensor] = []  # alive until the analysis ends: ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _METADATA:
            return out
        for t in _tensors((args, kwargs)):
            self.last_read[id(t)] = self.count
            self.keep.append(t)
        for t in _tensors(out):
            self.produced[id(t)] = self.count
            self.keep.append(t)
        self.count += 1
        return out


def _tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def find_cuts(model: nn.Module, example_input: Tensor) -> list[Cut]:
    """The cuts of ``model``'s forward on ``example_input``, in forward order, each named
    by the outermost module that ends there; ``stage_end`` marks the tap candidates."""
    trace = _Trace()
    ends: list[tuple[int, str, Tensor]] = []  # (ops done, module, output) per module end
    starts: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    macs_done: list[tuple[int, int]] = []  # (ops done, MACs) per Conv2d/Linear call

    repeated: set[str] = set()

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            if name in starts:
                repeated.add(name)  # a module called twice cannot be the tap
            starts[name] = (trace.count, tuple(x.shape[1:]) if x is not None else None)

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, out) -> None:
            if isinstance(out, Tensor):
                ends.append((trace.count, name, out))
            if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(out, Tensor):
                macs_done.append((trace.count, layer_macs(module, out)))

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
    trace.produced[id(example_input)] = -1
    trace.keep.append(example_input)
    with trace:
        forward_with_hooks(model, example_input, handles)
    total = sum(m for _, m in macs_done) or 1
    live = _Liveness(trace)
    cuts: list[Cut] = []
    at_point: dict[int, int] = {}  # ops done -> index in cuts
    for done, name, out in ends:
        if name in repeated or not live.is_cut(done, out):
            continue
        share = sum(m for at, m in macs_done if at <= done) / total
        cut = Cut(name, tuple(out.shape[1:]), share)
        if done not in at_point:
            at_point[done] = len(cuts)
            cuts.append(cut)
        elif starts[name][0] <= starts[cuts[at_point[done]].name][0]:
            # Several modules end here: name the cut by the one that began first (layer1,
            # not its last block; the stem, not the next stage's empty downsample).
            cuts[at_point[done]] = cut
    _mark_stage_ends(cuts, starts, {name: tuple(out.shape[1:]) for _, name, out in ends})
    return cuts


class _Liveness:
    """Answers "after ``done`` ops, is any tensor written earlier still read, other than
    ``out``?" in O(log n): the two latest-read tensors among those written before each point."""

    def __init__(self, trace: _Trace) -> None:
        entries = sorted(
            (at, trace.last_read.get(tid, -1), tid) for tid, at in trace.produced.items()
        )
        self.written_at = [at for at, _, _ in entries]
        self.top2: list[tuple[tuple[int, int], tuple[int, int]]] = []
        best, second = (-1, 0), (-1, 0)
        for _, read, tid in entries:
            if read > best[0]:
                best, second = (read, tid), best
            elif read > second[0]:
                second = (read, tid)
            self.top2.append((best, second))
        self.produced = trace.produced

    def is_cut(self, done: int, out: Tensor) -> bool:
        if id(out) not in self.produced:
            return False
        n = bisect.bisect_left(self.written_at, done)  # tensors written before ``done``
        if n == 0:
            return True
        best, second = self.top2[n - 1]
        latest = second if best[1] == id(out) else best
        return latest[0] < done


def _resolution(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Height and width of a per-sample feature map ``(C, H, W)``; None for other shapes."""
    return tuple(shape[1:]) if len(shape) == 3 else None


def _mark_stage_ends(
    cuts: list[Cut],
    starts: dict[str, tuple[int, tuple[int, ...] | None]],
    out_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Tokens: every cut. Feature maps: the last cut at each resolution (above 1x1) that
    does not lie inside a block taking that resolution to the next one."""
    maps = [c for c in cuts if _resolution(c.shape) and c.shape[1] * c.shape[2] > 1]
    for cut in cuts:
        cut.stage_end = len(cut.shape) == 2

    def in_transition(cut: Cut, res: tuple[int, ...], nxt: tuple[int, ...] | None) -> bool:
        for ancestor in _ancestors(cut.name):
            first = starts.get(ancestor, (0, None))[1]
            last = out_shapes.get(ancestor)
            if first and last and _resolution(first) == res and _resolution(last) == nxt:
                return True
        return False

    for i, cut in enumerate(maps):
        res = _resolution(cut.shape)
        later = maps[i + 1 :]
        nxt = next((_resolution(c.shape) for c in later if _resolution(c.shape) != res), None)
        if in_transition(cut, res, nxt):
            continue
        same = [c for c in later if _resolution(c.shape) == res]
        cut.stage_end = all(in_transition(c, res, nxt) for c in same)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:j]) for j in range(1, len(parts))]


def choose_tap(model: nn.Module, example_input: Tensor) -> TapChoice:
    """The default tap of ``model`` (see the module docstring), with the reason."""
    cuts = find_cuts(model, example_input)
    candidates = [c for c in cuts if c.stage_end and c.macs_share < 1.0]
    for cut in candidates:
        if cut.macs_share >= TAP_MACS_SHARE:
            shape = "x".join(map(str, cut.shape))
            reason = (
                f"chosen: the earliest stage end with {TAP_MACS_SHARE:.0%} of the MACs before "
                f"it ({cut.macs_share:.0%}; {cut.kind} {shape})"
            )
            return TapChoice(cut.name, reason, candidates)
    listed = ", ".join(f"{c.name} ({c.macs_share:.0%} of MACs)" for c in candidates) or "none"
    raise ValueError(
        f"cannot choose the tap module of {type(model).__name__}: no stage end has "
        f"{TAP_MACS_SHARE:.0%} of the MACs before it with layers left after it (considered: "
        f"{listed}); name one with spec.tap"
    )
