"""Is a DQ run's gain per image or per layer? Its controller against its own layer policy.

For each DQ run's ``best.pt``, on its test set: the controller's top-1 and BitOPs, and the
same shared weights with every image given each layer's most frequent choice (the
controller's per-layer majority, fixed for all images through ``forced_bits``: a static
mixed-precision network whose bits the controller chose). What the controller scores above
that fixed policy is what choosing per image buys; what the policy scores above the uniform
candidates' line is what choosing per layer buys.

    python benchmarks/per_layer_policy.py runs/reproduce_cifar10/pact_dq_budget*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from instaquant.builder import load_for_eval
from instaquant.data import build_loaders
from instaquant.evaluation import evaluate
from instaquant.policy import majority_policy
from instaquant.stats import line_at


def majority_bits(fraction: list[list[float]], candidates: list[int]) -> list[int]:
    """Each dynamic layer's most frequent candidate, from ``[layers][K]`` choice shares (the
    layer policy that ``instaquant.headroom`` measures for runs trained since it does)."""
    return majority_policy(torch.tensor(fraction), tuple(candidates))[0]


def measure(run: Path) -> dict:
    cfg, model, _ = load_for_eval(run / "best.pt", [])
    _, test_loader, _ = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    controller = evaluate(model, test_loader, cfg.ref_bits).metrics
    bits = majority_bits(controller["candidate_fraction"], list(model.spec.bits))
    with model.forced_bits(bits):
        fixed = evaluate(model, test_loader, cfg.ref_bits).metrics
    room = json.loads((run / "summary.json").read_text())["runs"][0]["headroom"]
    uniform = list(zip(room["uniform_bitops_rel"], room["uniform_top1"], strict=True))
    line = line_at(uniform, fixed["bitops_rel"])
    return {
        "run": run.name,
        "controller": [controller["top1"], controller["bitops_rel"]],
        "layer_policy_bits": bits,
        "layer_policy": [fixed["top1"], fixed["bitops_rel"]],
        "uniform_line_at_policy": line,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="DQ run folders (best.pt, summary.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | controller | its layer policy, every image alike | uniform line there |")
    print("|---|---|---|---:|")
    rows = []
    for run in args.runs:
        r = measure(run)
        rows.append(r)
        (c, cb), (f, fb) = r["controller"], r["layer_policy"]
        print(
            f"| {r['run']} | {c:.2f}% at {cb:.3f}x | {f:.2f}% at {fb:.3f}x "
            f"({''.join(map(str, r['layer_policy_bits']))}) | {r['uniform_line_at_policy']:.2f} |",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
