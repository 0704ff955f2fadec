"""Top-1 and per-image BitOPs of an exported ONNX graph in onnxruntime, on a run's test set.

The graph (``instaquant export RUN --out m.onnx [--bits policy]``) takes a fixed batch size;
the test images go through it in batches of that size, the last one padded by repeating its
final image (the padding's outputs are dropped). Prints the graph's top-1 beside PyTorch's
evaluation of the same checkpoint, and the graph's BitOPs relative to the run's reference.

    python benchmarks/exported_top1.py RUN m.onnx [--bits policy]   # --bits as given to export
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

from instaquant.builder import load_for_eval
from instaquant.evaluation import evaluate, reference_bitops
from instaquant.policy import resolve_bits


def onnx_outputs(path: Path, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted classes, labels and per-image BitOPs of the graph at ``path``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    preds, labels, bitops = [], [], []
    for x, y in loader:
        for chunk in x.cpu().split(batch):
            n = chunk.shape[0]
            padded = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
            logits, _, _, cost = session.run(None, {"images": padded.numpy()})
            preds.append(logits[:n].argmax(1))
            bitops.append(cost[:n])
        labels.append(y.cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(bitops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder the graph was exported from")
    p.add_argument("graph", type=Path, help="the exported .onnx file")
    p.add_argument("--bits", help="the --bits the graph was exported with, for PyTorch's figure")
    args = p.parse_args()
    cfg, model, extra = load_for_eval(args.run, ["device=cpu"])
    loader = extra["test_loader"]
    fixed = contextlib.nullcontext()
    if args.bits is not None:
        fixed = model.forced_bits(*resolve_bits(args.bits, model, loader))
    with fixed:
        torch_top1 = evaluate(model, loader, cfg.ref_bits, progress=True).metrics["top1"]
    preds, labels, bitops = onnx_outputs(args.graph, loader)
    ref = reference_bitops(model, cfg.ref_bits)
    print(
        f"onnxruntime: top1 {100 * float((preds == labels).mean()):.2f}% on {len(labels)} images, "
        f"BitOPs {bitops.mean() / ref:.3f}x of static {cfg.ref_bits}-bit "
        f"(per image {bitops.min() / ref:.3f}x to {bitops.max() / ref:.3f}x); "
        f"PyTorch: top1 {torch_top1:.2f}%"
    )


if __name__ == "__main__":
    main()
