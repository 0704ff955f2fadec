"""The demo's full-precision, static middle-candidate (W4A2) and DQ runs over several seeds,
and what the DQ run's headroom says there: its weights with every image at the middle
candidate, its controller, its layer policy and its cascade (every image at a cheap
candidate, the least confident again at a dearer one, both passes paid) against static W4A2.
One demo run's margins depend on its start; this gives their spread.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4   # about 2 min a seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from instaquant.demo import CANDIDATES, demo_configs
from instaquant.engine import fit

MIDDLE = CANDIDATES[len(CANDIDATES) // 2]  # the budget's bit-width
STATIC = f"static{MIDDLE}"
RUNS = ("fp", STATIC, "dq")  # what the comparison needs of the demo's runs
COLUMNS = {
    "uniform": "DQ weights, every image at the middle candidate",
    "dq": "DQ",
    "layer_policy": "its layer policy",
    "cascade": "its cascade",
}


def one_seed(out: Path, seed: int) -> dict:
    """Train (or reuse) the seed's runs; the DQ run's figures against static W4A2."""
    configs = {c.name: c for c in demo_configs(out)}
    for name in RUNS:
        cfg = configs[name]
        cfg.seed = seed
        if not (Path(cfg.out) / "summary.json").exists():
            fit(cfg, progress=False)

    def summary(name: str) -> dict:
        return json.loads((out / name / "summary.json").read_text())["runs"][0]

    static, dq = summary(STATIC), summary("dq")
    room = dq["headroom"]
    return {
        "seed": seed,
        "static": static["top1"],
        "uniform": room["uniform_top1"][CANDIDATES.index(MIDDLE)] - static["top1"],
        "dq": dq["top1"] - static["top1"],
        "dq_bitops": dq["bitops_mean"] / static["bitops_mean"],
        "layer_policy": room["layer_policy_top1"] - static["top1"],
        "cascade": room["cascade"]["top1"] - static["top1"],
        "cascade_bits": room["cascade"]["bits"],
        "rho_fp_loss": room["rho_fp_loss"],
        "p90_p10": room["bitops_p90_over_p10"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    args = p.parse_args()
    rows = [one_seed(args.out / f"s{seed}", seed) for seed in args.seeds]
    print(
        f"| seed | static W4A{MIDDLE} | DQ weights at A{MIDDLE} | DQ | p90/p10, ρ(fp loss) "
        "| its layer policy | its cascade (pair) |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        pair = "→".join(map(str, r["cascade_bits"]))
        print(
            f"| {r['seed']} | {r['static']:.2f}% | {r['uniform']:+.2f} "
            f"| {r['dq']:+.2f} at {r['dq_bitops']:.3f}x | {r['p90_p10']:.2f}, "
            f"{r['rho_fp_loss']:+.2f} | {r['layer_policy']:+.2f} | {r['cascade']:+.2f} ({pair}) |"
        )
    for key, what in COLUMNS.items():
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{what}: {statistics.mean(values):+.2f} ± {spread:.2f} points from static W4A{MIDDLE}"
        )
    (args.out / "demo_seeds.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
