"""A cascade on the cheap candidate's confidence, against a DQ run's controller.

For each DQ run's ``last.pt`` (the final model, whose figures its ``summary.json`` holds), on
its test set: every image runs at a cheap uniform candidate of the shared weights, and the
least confident share runs again at a dearer one from the tap on
(:meth:`instaquant.headroom.Headroom.cascade`), the share set so that the mean BitOPs, both
passes counted, meets a level. The levels: the controller's own BitOPs, the static 3-bit
BitOPs and 0.75x static 4-bit's. Unlike the ranked allocations of ``headroom_signals.py`` it
pays for what it sees, so it is a rule a deployment could run. The share is set on the test
images' confidences (no labels); the pair of candidates is the best of those that fit, which
does read the labels, so each figure is a slight overestimate.

    python benchmarks/cascade.py runs/reproduce_cifar10/pact_dq_budget3_* --out cascade.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from instaquant.builder import load_for_eval
from instaquant.data import build_loaders
from instaquant.headroom import measure_headroom

LEVELS = (0.5625, 0.75)  # BitOPs relative to static 4-bit, besides the controller's own


def measure(run: Path) -> dict:
    cfg, model, _ = load_for_eval(run / "last.pt", [])
    _, test_loader, _ = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    room = measure_headroom(model, test_loader, cfg.ref_bits)
    s = room.summary()
    ref = room.ref_bitops
    levels = [s["controller_bitops_rel"], *LEVELS]
    return {
        "run": run.name,
        "uniform": list(zip(s["uniform_bitops_rel"], s["uniform_top1"], strict=True)),
        "controller": [s["controller_top1"], s["controller_bitops_rel"]],
        "layer_policy": [s.get("layer_policy_top1"), s.get("layer_policy_bitops_rel")],
        "shared_bitops_rel": room.shared_bitops / ref,
        "cascades": [
            {"bitops_rel": rel, "front": room.front(rel * ref), **room.best_cascade(rel * ref)}
            for rel in levels
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="DQ run folders (last.pt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | controller | cascade at its BitOPs | at 0.5625x | at 0.75x |")
    print("|---|---|---|---|---|")
    rows = []
    for run in args.runs:
        r = measure(run)
        rows.append(r)
        c, cb = r["controller"]
        cells = [
            f"{x['top1']:.2f} ({x['bits'][0]}→{x['bits'][1]}, {100 * x['again']:.0f}% again)"
            if "top1" in x
            else "–"
            for x in r["cascades"]
        ]
        print(f"| {r['run']} | {c:.2f}% at {cb:.3f}x | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
