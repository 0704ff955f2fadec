"""Where the batch-128 inference time of a split dynamic model goes, operator by operator.

Builds the static and dynamic ResNet-20 of ``speed.py``, brings the process to its steady
state with the same training steps, then profiles inference of both and prints each
operator's self CPU time per forward, static against dynamic, largest difference first,
then the time oneDNN itself reports for its primitives (convolution kernels and layout
reorders) in one forward of each: what the split costs inside the kernels, apart from the
calls, copies and Python around them.

    python benchmarks/profile_split.py               # default layout, 2 threads
    python benchmarks/profile_split.py --channels-last
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from collections import defaultdict

import speed  # benchmarks/speed.py, next to this file
import torch
from torch.profiler import ProfilerActivity, profile


def op_times(model: torch.nn.Module, x: torch.Tensor, calls: int) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and call count per forward, by operator name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        speed.infer(model, x, calls)
    return {
        e.key: (e.self_cpu_time_total / calls / 1e3, e.count // calls) for e in prof.key_averages()
    }


def onednn_ms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Milliseconds and calls per oneDNN primitive kind in one forward, from oneDNN's verbose log.

    oneDNN prints the log with C stdio on file descriptor 1, so that descriptor is pointed at
    a temporary file for the forward.
    """
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                speed.infer(model, x)
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for line in log:
            fields = line.strip().split(",")
            if line.startswith("onednn_verbose") and "exec" in fields[:4]:
                kind = fields[fields.index("exec") + 2]  # after the engine ("cpu")
                found[kind][0] += float(fields[-1])
                found[kind][1] += 1
    return {kind: (ms, int(calls)) for kind, (ms, calls) in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10, help="forwards profiled per model")
    parser.add_argument("--rows", type=int, default=20, help="operators shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models, x, _ = speed.trained_models(speed.SETUPS["resnet20"], 7, fmt, torch.device("cpu"))
    speed.infer(models["fast"], x)
    print("evaluation choices: " + speed.choice_summary(models["fast"].last.bits_w))
    static = op_times(models["static"], x, args.calls)
    dynamic = op_times(models["fast"], x, args.calls)
    total_s, total_d = (sum(t for t, _ in d.values()) for d in (static, dynamic))
    print(f"operator self time per forward: static {total_s:.1f} ms, dynamic {total_d:.1f} ms")
    names = sorted(
        set(static) | set(dynamic),
        key=lambda n: -abs(dynamic.get(n, (0, 0))[0] - static.get(n, (0, 0))[0]),
    )
    print(f"\n{'operator':34s} {'static ms':>10s} {'calls':>5s} {'dynamic ms':>10s} {'calls':>5s}")
    for name in names[: args.rows]:
        (ts, cs), (td, cd) = static.get(name, (0.0, 0)), dynamic.get(name, (0.0, 0))
        print(f"{name:34s} {ts:10.2f} {cs:5d} {td:10.2f} {cd:5d}  {td - ts:+.2f}")

    kernels = {n: onednn_ms(models[n], x) for n in ("static", "fast")}
    if not any(kernels.values()):
        print("\noneDNN logged no primitives (a build without oneDNN verbose support)")
        return
    print("\ninside oneDNN, one forward (its own timing of each primitive):")
    for kind in sorted(set(kernels["static"]) | set(kernels["fast"])):
        (ts, cs), (td, cd) = (kernels[n].get(kind, (0.0, 0)) for n in ("static", "fast"))
        print(f"{kind:34s} {ts:10.2f} {cs:5d} {td:10.2f} {cd:5d}  {td - ts:+.2f}")


if __name__ == "__main__":
    main()
