"""The demo's full-precision, static 3-bit and DQ runs over several seeds, and what the DQ
run's headroom says there: its controller, its layer policy and its cascade (every image at a
cheap candidate, the least confident again at a dearer one, both passes paid) against static
3-bit. One demo run's margins are within a few test images of noise; this gives their spread.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4   # about 2 min a seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from instaquant.demo import demo_configs
from instaquant.engine import fit

RUNS = ("fp", "static3", "dq")  # what the comparison needs of the demo's runs


def one_seed(out: Path, seed: int) -> dict:
    """Train (or reuse) the seed's runs; the DQ run's figures against static 3-bit."""
    configs = {c.name: c for c in demo_configs(out)}
    for name in RUNS:
        cfg = configs[name]
        cfg.seed = seed
        if not (Path(cfg.out) / "summary.json").exists():
            fit(cfg, progress=False)

    def summary(name: str) -> dict:
        return json.loads((out / name / "summary.json").read_text())["runs"][0]

    static3, dq = summary("static3")["top1"], summary("dq")
    room = dq["headroom"]
    return {
        "seed": seed,
        "static3": static3,
        "dq": dq["top1"] - static3,
        "dq_bitops_rel": dq["bitops_rel"],
        "layer_policy": room["layer_policy_top1"] - static3,
        "cascade": room["cascade"]["top1"] - static3,
        "cascade_bits": room["cascade"]["bits"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    args = p.parse_args()
    rows = [one_seed(args.out / f"s{seed}", seed) for seed in args.seeds]
    print("| seed | static 3-bit | DQ | its layer policy | its cascade (pair) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        pair = "→".join(map(str, r["cascade_bits"]))
        print(
            f"| {r['seed']} | {r['static3']:.2f}% | {r['dq']:+.2f} at {r['dq_bitops_rel']:.3f}x "
            f"| {r['layer_policy']:+.2f} | {r['cascade']:+.2f} ({pair}) |"
        )
    for key in ("dq", "layer_policy", "cascade"):
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.mean(values):+.2f} ± {spread:.2f} points from static 3-bit")
    (args.out / "demo_seeds.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
