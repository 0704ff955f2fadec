"""One file per quantized model: ``iq.save(model, path)`` and ``iq.load(path)``.

The file is an instaquant checkpoint (:mod:`.checkpoint`: plain types, written atomically,
read with ``weights_only=True``) holding the weights under ``model`` and, under
``quant_model``, what converting the backbone again needs: the registry architecture, the
spec (dynamic) or method and bits (static), the conversion example's shape, the
signed-activation plan and the controller's temperature. The command line's ``best.pt`` and
``last.pt`` carry the same two entries, so :func:`load` reads them too.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .convert import DynamicQuantModel, DynamicSpec, QuantModel, StaticQuantModel, dynamic, static
from .cost import Budget
from .models.arch import arch_of


def describe(model: QuantModel) -> dict[str, Any]:
    """The ``quant_model`` entry of a saved file: how to convert the backbone again."""
    signed = {i.name: bool(i.input_negative) for i in model.quantized_layers}
    entry: dict[str, Any] = {
        "arch": arch_of(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "example_shape": list(model.example_shape or ()),
        "signed": signed,
    }
    if isinstance(model, DynamicQuantModel):
        spec = dataclasses.asdict(model.spec)
        spec["signed"] = signed
        entry.update(kind="dynamic", spec=spec, tau=float(model.tau))
        entry["tap_reason"] = model.tap_reason
    elif isinstance(model, StaticQuantModel):
        entry.update(kind="static", static=dict(model.conversion))
    else:
        raise TypeError(f"iq.save takes a quantized model (iq.dynamic / iq.static), got {model!r}")
    return entry


def save(model: QuantModel, path: str | Path) -> None:
    """Write ``model`` (static or dynamic) to ``path`` in one atomic step."""
    if not isinstance(model, QuantModel):
        raise TypeError(
            f"iq.save takes a quantized model (iq.dynamic / iq.static), got {type(model).__name__}"
        )
    save_checkpoint(path, quant_model=describe(model), model=model.state_dict())


def load(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> QuantModel:
    """The quantized model saved at ``path`` (a file of :func:`save`, or a run's checkpoint),
    in evaluation mode, on ``map_location``, in the saved dtype. ``model`` gives the full-precision backbone when
    it was not built by :mod:`instaquant.models` (its weights are replaced by the file's)."""
    ckpt = load_checkpoint(path, map_location)
    entry = ckpt.get("quant_model")
    if not isinstance(entry, dict) or entry.get("kind") not in ("dynamic", "static"):
        raise CheckpointError(
            f"{str(path)!r} holds no quantized model description (a full-precision run, or a "
            "checkpoint from before instaquant 0.1 saved one); rebuild it with instaquant eval"
        )
    # A copy of the caller's network: moving it to the saved device and dtype must not move theirs.
    backbone = copy.deepcopy(model) if model is not None else _backbone(entry, path)
    device = torch.device(map_location)
    dtype = getattr(torch, entry.get("dtype", "float32"))
    example = torch.zeros(1, *entry["example_shape"], device=device, dtype=dtype)
    backbone = backbone.to(device=device, dtype=dtype)  # the saved values, not rounded
    if entry["kind"] == "dynamic":
        result: QuantModel = dynamic(backbone, _spec(entry["spec"], path), example)
    else:
        s = entry["static"]
        result = static(
            backbone,
            s["method"],
            s["bits"],
            example,
            s["first_last"],
            tuple(s["exclude"]),
            s["share"],
            entry["signed"],
            s.get("product_bits"),
            s.get("weight_bits"),
            s.get("layer_bits"),
        )
    load_model_state(result, ckpt["model"], f"file {str(path)!r}")
    if isinstance(result, DynamicQuantModel):
        result.set_temperature(entry["tau"])
        result.tap_reason = entry.get("tap_reason", result.tap_reason)
    return result.eval()


def _backbone(entry: dict, path: str | Path) -> nn.Module:
    arch = entry.get("arch")
    if arch is None:
        raise CheckpointError(
            f"{str(path)!r} was saved from a backbone outside instaquant.models; pass it: "
            "iq.load(path, model=<the full-precision network>)"
        )
    return models.get(arch["name"], arch["num_classes"], in_channels=arch["in_channels"])


def _spec(fields: dict[str, Any], path: str | Path) -> DynamicSpec:
    known = {f.name for f in dataclasses.fields(DynamicSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer instaquant (unknown spec fields: "
            f"{', '.join(unknown)}); upgrade instaquant to load it"
        )
    tuples = {"bits", "exclude"}
    values = {k: tuple(v) if k in tuples else v for k, v in fields.items()}
    values["budget"] = Budget(**fields["budget"])
    return DynamicSpec(**values)
