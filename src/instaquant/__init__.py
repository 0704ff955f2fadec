"""instaquant: instance-aware dynamic neural network quantization for PyTorch."""

from . import cost, models, quant
from .controller import BitController
from .convert import (
    DynamicQuantModel,
    DynamicSpec,
    ForwardRecord,
    StaticQuantModel,
    dynamic,
    static,
)
from .cost import Budget
from .export import export
from .losses import distillation_loss, rank_loss
from .nn.layers import DynamicQConv2d, DynamicQLinear, QConv2d, QLinear
from .saving import load, save

__version__ = "0.1.0"

__all__ = [
    "BitController",
    "Budget",
    "DynamicQConv2d",
    "DynamicQLinear",
    "DynamicQuantModel",
    "DynamicSpec",
    "ForwardRecord",
    "QConv2d",
    "QLinear",
    "StaticQuantModel",
    "cost",
    "distillation_loss",
    "dynamic",
    "export",
    "load",
    "models",
    "quant",
    "rank_loss",
    "save",
    "static",
]
