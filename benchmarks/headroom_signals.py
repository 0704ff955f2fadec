"""Where a trained DQ run's accuracy goes: difficulty signals and BatchNorm statistics.

For a DQ run's ``best.pt`` (any dataset the run's config names), on its test set:

1. Ranked allocations (:meth:`instaquant.headroom.Headroom.ranked`) over a sweep of BitOPs
   levels: the images sorted by a difficulty signal (the full-precision loss of the run's
   ``model.init`` network, the cheapest candidate's confidence, a random order) and split
   between two uniform candidates so that the mean BitOPs meets the level; the best pair per
   level, against the uniform candidates' line. What ranking images by that signal could buy.
2. The uniform candidates' top-1 with the shared BatchNorm statistics as trained, and with
   them re-estimated at that candidate on ``--batches`` training batches; the controller's
   top-1 with them re-estimated under its own choices. How much of the shared weights' loss
   at each candidate is in the statistics.

    python benchmarks/headroom_signals.py runs/reproduce_cifar10/pact_dq_budget3 --batches 40
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import torch
from torch import nn

from instaquant.builder import init_model, load_for_eval
from instaquant.data import build_loaders
from instaquant.evaluation import evaluate
from instaquant.headroom import Headroom, measure_headroom

LEVELS = (0.40, 0.45, 0.50, 0.5625, 0.65, 0.75)  # BitOPs relative to the run's reference


def ranked_sweep(room: Headroom, levels: tuple[float, ...]) -> list[dict]:
    signals = {"random order": torch.rand(room.n, generator=torch.Generator().manual_seed(0))}
    if room.fp_loss is not None:
        signals["fp loss"] = room.fp_loss
    if room.confidence is not None:
        signals["cheapest candidate's confidence"] = -room.confidence[:, 0]
    xs = room.uniform_bitops.tolist()
    rows = []
    for rel in levels:
        b = rel * room.ref_bitops
        if not xs[0] <= b <= xs[-1]:
            continue
        row = {"bitops_rel": rel, "line": room.front(b)}
        for name, score in signals.items():
            row[name] = room.best_ranked(score, b)
        rows.append(row)
    return rows


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrated(model, loader, batches: int, bits: list[int] | None) -> nn.Module:
    """A copy whose backbone BatchNorms re-estimate their running statistics (cumulative
    average over ``batches`` training batches) at forced ``bits``, or under the controller's
    own choices when ``bits`` is None."""
    m = copy.deepcopy(model).eval()
    for bn in _bns(m.model):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with m.forced_bits(bits) if bits is not None else contextlib.nullcontext():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            m(x)
    return m.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model, extra = load_for_eval(args.run / "best.pt", [])
    train_loader, test_loader, info = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    fp = init_model(cfg, info, torch.device("cpu"))
    room = measure_headroom(model, test_loader, cfg.ref_bits, fp, progress=True)
    s = room.summary()
    print(
        f"{args.run}: controller {s['controller_top1']:.2f}% at {s['controller_bitops_rel']:.3f}x"
    )
    rows = ranked_sweep(room, LEVELS)
    names = [k for k in rows[0] if k not in ("bitops_rel", "line")]
    print("\nRanked allocations (top-1 %, best pair of candidates) against the uniform line")
    print("| BitOPs | uniform line | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for r in rows:
        cells = [f"{r[n][0]:.2f} ({'+'.join(map(str, r[n][1]))})" for n in names]
        print(f"| {r['bitops_rel']:.3f}x | {r['line']:.2f} | " + " | ".join(cells) + " |")
    L = len(model.dynamic_layers)
    print(f"\nBatchNorm statistics re-estimated on {args.batches} training batches")
    print("| assignment | as trained | re-estimated |")
    print("|---|---:|---:|")
    result = {"ranked": rows, "batches": args.batches, "recalibration": {}}
    for k, b in enumerate(model.spec.bits):
        after = recalibrated(model, train_loader, args.batches, [b] * L)
        with after.forced_bits([b] * L):
            top1 = evaluate(after, test_loader, cfg.ref_bits).metrics["top1"]
        before = s["uniform_top1"][k]
        result["recalibration"][f"uniform {b}-bit"] = [before, top1]
        print(f"| uniform {b}-bit | {before:.2f} | {top1:.2f} |", flush=True)
    after = recalibrated(model, train_loader, args.batches, None)
    m = evaluate(after, test_loader, cfg.ref_bits).metrics
    result["recalibration"]["controller"] = [s["controller_top1"], m["top1"], m["bitops_rel"]]
    print(
        f"| the controller | {s['controller_top1']:.2f} | {m['top1']:.2f} (at {m['bitops_rel']:.3f}x) |"
    )
    (args.run / "headroom_signals.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
