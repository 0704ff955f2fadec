"""onnxruntime latency of an exported dynamic model over the exported static one.

For each model and batch size, a DQ model (candidates 2/3/4 bits, controller inside) and a
static 4-bit model are exported with ``iq.export`` and run in onnxruntime side by side in
one process, alternating, on the same input; the ratio of their median latencies is
printed. Also, in PyTorch eager, the graph-static execution against routed inference.

    python benchmarks/export_speed.py                 # ResNet-20 at 32 px, ResNet-18 at 224 px
    python benchmarks/export_speed.py --threads 2 --repeats 30 --onnx-only

Needs the ``[export]`` extra. Weights are random: latency does not depend on their values,
only on the graph (the controller's choices move no work in the graph-static form).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import instaquant as iq


def _models(name: str, size: int) -> tuple[iq.DynamicQuantModel, iq.StaticQuantModel]:
    fp = iq.models.get(name, num_classes=10 if name == "resnet20" else 1000)
    example = torch.randn(2, 3, size, size)
    spec = iq.DynamicSpec(method="pact", bits=(2, 3, 4), budget=iq.Budget(target_bits=3))
    dq = iq.dynamic(fp, spec, example)
    qs = iq.static(fp, "pact", 4, example)
    for m in (dq, qs):  # clips set from a batch, as after training
        m.train()
        m(torch.randn(4, 3, size, size))
        m.eval()
    return dq, qs


def _side_by_side(a, b, x, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a(x)`` and ``b(x)``, called alternately after a warm-up."""
    for _ in range(3):
        a(x), b(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, ts in zip((a, b), times, strict=True):
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def onnx_ratio(name: str, size: int, batch: int, threads: int, repeats: int, tmp: Path) -> dict:
    import onnxruntime as ort

    dq, qs = _models(name, size)
    x = torch.randn(batch, 3, size, size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = []
    for tag, model in (("dq", dq), ("static", qs)):
        path = iq.export(model, x, tmp / f"{name}_{tag}_{batch}.onnx")
        sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
    feed = x.numpy()
    runs = [lambda f, s=s: s.run(["logits"], {"images": f}) for s in sessions]
    t_dq, t_static = _side_by_side(*runs, feed, repeats)
    return {"model": name, "size": size, "batch": batch, "dq_ms": 1e3 * t_dq,
            "static_ms": 1e3 * t_static, "ratio": t_dq / t_static}  # fmt: skip


def eager_ratio(name: str, size: int, batch: int, repeats: int) -> dict:
    dq, _ = _models(name, size)
    x = torch.randn(batch, 3, size, size)
    graph = copy.deepcopy(dq)
    graph.set_execution("graph")
    with torch.no_grad():
        t_graph, t_routed = _side_by_side(graph, dq, x, repeats)
    return {"model": name, "size": size, "batch": batch, "graph_ms": 1e3 * t_graph,
            "routed_ms": 1e3 * t_routed, "ratio": t_graph / t_routed}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--onnx-only", action="store_true", help="skip the PyTorch eager comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cases = [("resnet20", 32, 1), ("resnet20", 32, 32), ("resnet18", 224, 1), ("resnet18", 224, 32)]
    print(f"onnxruntime, {args.threads} threads: exported DQ {{2,3,4}} over exported static 4-bit")
    print("| model | input | batch | DQ ms | static ms | DQ / static |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, batch in cases:
            r = onnx_ratio(name, size, batch, args.threads, args.repeats, Path(tmp))
            print(f"| {name} | {size} | {batch} | {r['dq_ms']:.2f} | {r['static_ms']:.2f} | "
                  f"{r['ratio']:.2f}x |", flush=True)  # fmt: skip
    if args.onnx_only:
        return
    print(f"\nPyTorch eager, {args.threads} threads: graph-static execution over routed inference")
    print("| model | input | batch | graph ms | routed ms | graph / routed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, batch in [*cases, ("resnet20", 32, 128)]:
        r = eager_ratio(name, size, batch, args.repeats)
        print(f"| {name} | {size} | {batch} | {r['graph_ms']:.2f} | {r['routed_ms']:.2f} | "
              f"{r['ratio']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
