"""Fixed bits for a DQ model: every image at one bit-width per dynamic layer, no controller.

DQ training under a BitOPs budget finds a per-layer mix of bits, and on CIFAR-10 ResNet-20
nearly all of its gain over static quantization is that mix (docs/results.md). These helpers
name such an assignment: the *layer policy* (each dynamic layer's most frequent choice of the
controller over a set of images; no labels needed), one candidate for every layer, or one
candidate per layer. The model runs it through
:meth:`~instaquant.convert.DynamicQuantModel.forced_bits`, in evaluation and in export.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from .convert import DynamicQuantModel
from .errors import UserError

Bits = tuple[list[int], list[int]]  # (weight bits, activation bits) per dynamic layer


@torch.no_grad()
def layer_policy(
    model: DynamicQuantModel, batches: Iterable[tuple[Tensor, Tensor]], progress: bool = False
) -> Bits:
    """Each dynamic layer's most frequent choice of the controller on ``batches`` (their
    labels are not read), as candidate bit-widths for :meth:`forced_bits`."""
    was_training = model.training
    model.eval()
    counts: Tensor | None = None  # [L, K] (or [L, 2, K]) choices per candidate
    try:
        for x, _ in tqdm(
            batches, desc="layer policy", leave=False, disable=None if progress else True
        ):
            model(x)
            chosen = model.last.selection.sum(0).double().cpu()
            counts = chosen if counts is None else counts + chosen
    finally:
        model.train(was_training)
    if counts is None:
        raise UserError("the layer policy needs images, and the evaluation set is empty")
    return majority_policy(counts, model.spec.bits)


def parse_bits(text: str, model: DynamicQuantModel) -> Bits | None:
    """``--bits`` as given on the command line: None for ``policy`` (to be measured), else
    one candidate for every dynamic layer (``3``) or one per layer (``3,3,2,4,...``)."""
    if text == "policy":
        return None
    L, candidates = len(model.dynamic_layers), model.spec.bits
    allowed = (
        f"allowed: policy, one of the candidates {', '.join(map(str, candidates))}, or {L} "
        "comma-separated candidates (one per dynamic layer)"
    )
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) in candidates for p in parts) or len(parts) not in (1, L):
        raise UserError(f"--bits {text!r} is not an assignment of this model's bits; {allowed}")
    bits = [int(p) for p in parts] * (L if len(parts) == 1 else 1)
    return bits, list(bits)


def resolve_bits(
    text: str, model: DynamicQuantModel, batches: Iterable[tuple[Tensor, Tensor]]
) -> Bits:
    """``--bits`` resolved: :func:`parse_bits`, with ``policy`` measured on ``batches``."""
    return parse_bits(text, model) or layer_policy(model, batches, progress=True)


def describe(bits: Bits, model: DynamicQuantModel) -> str:
    """One line per dynamic layer: its name and its weight and activation bits."""
    weights, acts = recorded_bits(bits, model.spec.weight_bits)
    rows = zip(model.dynamic_layers, weights, acts, strict=True)
    return "\n".join(f"  {info.name:<32} W{w}A{a}" for info, w, a in rows)


def static_layer_bits(bits: Bits, model: DynamicQuantModel) -> dict[str, int] | None:
    """A fixed assignment as the ``layer_bits`` of a static model (:func:`instaquant.static`,
    config ``quant.layer_bits``) whose other quantized layers are at ``spec.fixed_bits``: the
    dynamic layers by name; activation bits only when ``weight_bits`` fixes the weights. None
    when weights and activations differ in some layer (a static layer has one bit-width)."""
    chosen_w, chosen_a = bits
    if model.spec.weight_bits is None and list(chosen_w) != list(chosen_a):
        return None
    return {info.name: int(b) for info, b in zip(model.dynamic_layers, chosen_a, strict=True)}


def recorded_bits(policy: Bits, weight_bits: int | None) -> list[list[int]]:
    """A policy as [bits_w, bits_a] per layer, for the record: with ``weight_bits`` fixed the
    candidate names the activation bits only, and the weights are at ``weight_bits``."""
    chosen_w, chosen_a = policy
    return [
        list(chosen_w) if weight_bits is None else [weight_bits] * len(chosen_w),
        list(chosen_a),
    ]


def majority_policy(choices: Tensor, bits: tuple[int, ...]) -> Bits:
    """Each layer's most frequent candidate, as (weight bits, activation bits) per layer, from
    choice counts or shares ``[L, K]`` (or ``[L, 2, K]`` with separate weight/activation bits)."""
    top = choices.argmax(-1)  # [L] or [L, 2]
    if top.dim() == 1:
        top = torch.stack([top, top], 1)
    return [bits[int(i)] for i in top[:, 0]], [bits[int(i)] for i in top[:, 1]]
