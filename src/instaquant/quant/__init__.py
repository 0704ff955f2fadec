"""Quantizer primitives (functional) and per-method quantizer modules (methods)."""

from . import functional
from .methods import METHODS, make_activation_quantizer, make_weight_quantizer

__all__ = ["METHODS", "functional", "make_activation_quantizer", "make_weight_quantizer"]
