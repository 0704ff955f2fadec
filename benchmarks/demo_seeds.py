"""The demo's full-precision, static and DQ runs over several seeds, and what the DQ run's
headroom says there: the controller, its layer policy and its cascade (every image at a cheap
candidate, the least confident again at a dearer one, both passes paid), each against the
static models' line at its own BitOPs, and the controller against its own weights' uniform
line (what choosing per image buys on the same weights). One demo run's margins move with the
seed; this gives their spread.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4   # about 1 min a seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from instaquant.demo import demo_configs
from instaquant.engine import fit
from instaquant.stats import line_at

KEYS = ("dq", "own_line", "layer_policy", "cascade", "dq_minus_middle")


def one_seed(out: Path, seed: int) -> dict:
    """Train (or reuse) the seed's runs; the DQ run's figures against the static line."""
    configs = demo_configs(out)
    for cfg in configs:
        cfg.seed = seed
        if not (Path(cfg.out) / "summary.json").exists():
            fit(cfg, progress=False)
    entries = {
        c.name: json.loads((Path(c.out) / "summary.json").read_text())["runs"][0] for c in configs
    }
    static = sorted(
        (e["bitops_rel"], e["top1"]) for e in entries.values() if e["recipe"] == "static"
    )
    middle = static[len(static) // 2]
    dq = entries["dq"]
    room = dq["headroom"]
    uniform = list(zip(room["uniform_bitops_rel"], room["uniform_top1"], strict=True))

    def vs_static(top1: float, bitops_rel: float) -> float:
        return top1 - line_at(static, bitops_rel)

    return {
        "seed": seed,
        "middle": middle[1],
        "dq_top1": dq["top1"],
        "dq_bitops": dq["bitops_rel"] / middle[0],
        "dq": vs_static(dq["top1"], dq["bitops_rel"]),
        "own_line": dq["top1"] - line_at(uniform, dq["bitops_rel"]),
        "layer_policy": vs_static(room["layer_policy_top1"], room["layer_policy_bitops_rel"]),
        "cascade": vs_static(room["cascade"]["top1"], room["cascade"]["bitops_rel"]),
        "cascade_bits": room["cascade"]["bits"],
        "dq_minus_middle": dq["top1"] - middle[1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    args = p.parse_args()
    rows = [one_seed(args.out / f"s{seed}", seed) for seed in args.seeds]
    print(
        "| seed | static, middle | DQ (BitOPs x middle) | DQ vs the static line | vs its weights' "
        "uniform line | its layer policy vs the line | its cascade (pair) vs the line | "
        "DQ minus the middle static |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        pair = "→".join(map(str, r["cascade_bits"]))
        print(
            f"| {r['seed']} | {r['middle']:.2f}% | {r['dq_top1']:.2f}% at {r['dq_bitops']:.3f}x "
            f"| {r['dq']:+.2f} | {r['own_line']:+.2f} | {r['layer_policy']:+.2f} "
            f"| {r['cascade']:+.2f} ({pair}) | {r['dq_minus_middle']:+.2f} |"
        )
    for key in KEYS:
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.mean(values):+.2f} ± {spread:.2f} points")
    (args.out / "demo_seeds.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
