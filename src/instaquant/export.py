"""Export a quantized model as a graph: ``torch.export`` (``.pt2``) or ONNX.

The exported graph is the graph-static execution (:mod:`.indexed`) of a frozen copy: the
controller inside, each sample's candidate selected by indexing, every candidate's
quantized weight a constant (the float weights stay behind). It returns the logits and,
per image, the chosen bits ``[B, L]`` (weights and activations) and the BitOPs ``[B]``. Quantization stays simulated
in floating point (quantize/dequantize per candidate); integer kernels are the runtime's.
The graph takes inputs of the example's shape, batch size included. Exported inside
:meth:`~.convert.DynamicQuantModel.forced_bits`, it is the static network at those bits:
no controller, one quantized weight per layer.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import default_file_mode
from .convert import DynamicQuantModel, QuantModel
from .errors import UserError
from .nn.indexed import UnsupportedForGraphError
from .quant.methods import InitFlags

FORMATS = ("onnx", "pt2")
OUTPUT_NAMES = ("logits", "bits_w", "bits_a", "bitops")


class ExportError(UserError):
    pass


class WithCosts(nn.Module):
    """``x -> (logits, bits_w [B, L], bits_a [B, L], bitops [B])`` of a quantized model."""

    def __init__(self, model: QuantModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = self.model(x)
        rec = self.model.last
        B = x.shape[0]
        return (
            logits,
            rec.bits_w.reshape(B, -1).float(),
            rec.bits_a.reshape(B, -1).float(),
            rec.bitops.reshape(B).float(),
        )


def deployable(model: QuantModel, example_input: Tensor) -> WithCosts:
    """A frozen copy of ``model`` in graph-static execution, checked on ``example_input``
    (its outputs equal the model's own evaluation), wrapped to return the costs too."""
    if not isinstance(model, QuantModel):
        raise ExportError(
            f"export takes a quantized model (iq.dynamic / iq.static), got {type(model).__name__}"
        )
    forced = isinstance(model, DynamicQuantModel) and model._forced is not None
    if isinstance(model, DynamicQuantModel) and model.spec.sample_in_eval and not forced:
        raise ExportError(
            "the model samples its choices in evaluation (sample_in_eval=True): an exported "
            "graph must be deterministic; set model.spec.sample_in_eval = False first"
        )
    shape = tuple(example_input.shape[1:])
    if model.example_shape is not None and shape != tuple(model.example_shape):
        raise ExportError(
            f"example input of shape {shape} but the model was converted at "
            f"{tuple(model.example_shape)}: export at the converted size (its BitOPs count it)"
        )
    frozen = copy.deepcopy(model).eval().requires_grad_(False)  # inference only
    if isinstance(frozen, DynamicQuantModel):
        frozen.set_execution("graph")
        if forced:  # inside forced_bits: a static graph at those bits, no choice sampled
            frozen.pin_forced_bits()
            _drop_unread(frozen)
    try:
        with torch.no_grad():
            frozen(example_input)  # sets lazily initialised clips/steps, as evaluation would
    except UnsupportedForGraphError as err:
        raise ExportError(str(err)) from None
    for module in frozen.modules():
        if hasattr(module, "freeze_weights"):
            module.freeze_weights()
            # Forwards now read the quantized copies alone: without the float weight and its
            # quantizer, neither is an unused input of the exported program.
            del module.weight
            module.wq = None
            module.__dict__["branch_select"] = True  # batch 1: one branch per candidate
        if isinstance(module, InitFlags):
            if not module.all_initialized():
                raise ExportError(f"quantizer {type(module).__name__} never saw data")
            module.__dict__["frozen_ready"] = True
    return WithCosts(frozen).eval()


def _drop_unread(frozen: DynamicQuantModel) -> None:
    """At fixed bits the controller and the other candidates' BatchNorms never run: without
    them their weights are no unused inputs of an exported program."""
    frozen.controller = nn.Identity()
    for _, bn in frozen.candidate_bn_modules():
        bn.keep_pinned_only()


def export(
    model: QuantModel, example_input: Tensor, path: str | Path, format: str = "onnx"
) -> Path:
    """Write ``model``'s graph-static form to ``path`` as ONNX or a ``torch.export`` archive
    (``.pt2``); nothing is left at ``path`` when it fails. Returns the path."""
    if format not in FORMATS:
        raise ExportError(f"format {format!r} is not allowed; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    wrapped = deployable(model, example_input)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: torch.export.save expects ".pt2".
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            if format == "pt2":
                program = torch.export.export(wrapped, (example_input,), strict=False)
                torch.export.save(program, tmp)
            else:
                _onnx(wrapped, example_input, tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide the graph from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _onnx(wrapped: nn.Module, example_input: Tensor, path: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo-based exporter needs it)
    except ImportError:
        raise ExportError(
            "ONNX export needs the export extra: pip install 'instaquant[export]'"
        ) from None
    program = torch.export.export(wrapped, (example_input,), strict=False)
    onnx_program = torch.onnx.export(
        program,
        (example_input,),
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
        dynamo=True,
        verbose=False,
    )
    onnx_program.save(path)
