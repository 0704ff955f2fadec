"""The registry name a model was built under, kept on the module so a converted copy can be
rebuilt from a saved file (:func:`instaquant.load`)."""

from __future__ import annotations

from torch import nn

ATTRIBUTE = "instaquant_arch"


def tag(model: nn.Module, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Record how :func:`instaquant.models.get` builds ``model`` again; returns ``model``."""
    setattr(
        model, ATTRIBUTE, {"name": name, "num_classes": num_classes, "in_channels": in_channels}
    )
    return model


def arch_of(model: nn.Module) -> dict | None:
    """The recorded build arguments of ``model`` (or of a quantized model's backbone)."""
    found = getattr(model, ATTRIBUTE, None)
    if found is None and isinstance(getattr(model, "model", None), nn.Module):
        found = getattr(model.model, ATTRIBUTE, None)
    return dict(found) if found is not None else None
