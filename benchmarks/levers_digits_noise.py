"""Each DQ option alone on the digits at four noise strengths (a task of known difficulty).

From one full-precision model, static 2/3/4-bit and DQ {2,3,4} at the static 3-bit BitOPs
train on the same schedule, once per seed; DQ once with today's defaults and once per option
(:data:`LEVERS`). Prints a table of means and spreads over the seeds: top-1, BitOPs (x static
3-bit), Spearman ρ of per-image BitOPs against the known noise strength, per-image BitOPs
p90/p10, and the share of the oracle's gain the controller captures.

    python benchmarks/levers_digits_noise.py --seeds 0 1 2   # about 30 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from instaquant import config as config_mod
from instaquant.builder import load_for_eval
from instaquant.data import noise_of_test_images
from instaquant.engine import fit
from instaquant.evaluation import evaluate
from instaquant.stats import spearman

DATA = {"name": "digits_noise", "batch_size": 64, "eval_batch_size": 512}
QAT = ["epochs=12", "optim.lr=0.02", "optim.weight_decay=1e-4", "reference_bits=3"]
DQ = [
    "recipe=dynamic",
    "quant.bits=[2,3,4]",
    "quant.tau_final=0.2",
    "budget.target_bits=3",
    "budget.weight=2.0",
]
LEVERS: dict[str, list[str]] = {
    "default": [],
    "grid4": ["quant.controller_grid=4"],
    "stats": ["quant.controller_stats=true"],
    "candidate_bn": ["quant.candidate_bn=true"],
    "distill_fp": ["distill.teacher=fp"],
    "distill_highest": ["distill.teacher=highest"],
    "warmup": ["quant.random_epochs=4"],
    "controller_lr10": ["optim.controller_lr_scale=10"],
}


def train(out: Path, name: str, overrides: list[str]) -> Path:
    """Train (or reuse, when finished) one run; its folder."""
    run = out / name
    if not (run / "summary.json").exists():
        raw = {"name": name, "out": str(run), "model": {"name": "digits_net"}, "data": DATA}
        fit(config_mod.from_dict(raw, overrides), progress=False, overwrite=True)
    return run


def measure(run: Path) -> dict[str, Any]:
    """Top-1, BitOPs, ρ against the noise strength and the headroom figures of a run."""
    entry = json.loads((run / "summary.json").read_text())["runs"][0]
    row = {"top1": entry["top1"], "bitops_rel": entry["bitops_rel"]}
    room = entry.get("headroom")
    if room is not None:
        cfg, model, extra = load_for_eval(run / "last.pt")
        per = evaluate(model, extra["test_loader"], cfg.ref_bits, per_sample=True).per_sample
        noise = noise_of_test_images(per["bitops"].numel())
        row.update(
            rho_noise=spearman(per["bitops"].double(), noise),
            p90_p10=room["bitops_p90_over_p10"],
            captured=room["captured_share"],
            monotone_top1=room["monotone_oracle_top1"],
            monotone_bitops_rel=room["monotone_oracle_bitops_rel"],
        )
    return row


def spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/levers_digits_noise"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--levers", nargs="*", choices=sorted(LEVERS), help="default: all")
    p.add_argument("--threads", type=int, default=1, help="small networks run best on one")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fp = train(args.out, "fp", ["recipe=fp", "epochs=15", "optim.lr=0.1"])
    init = f"model.init={fp}"
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for bits in (2, 3, 4):
            run = train(
                args.out,
                f"static{bits}_s{seed}",
                [*QAT, "recipe=static", f"quant.bits=[{bits}]", init, f"seed={seed}"],
            )
            rows.setdefault(f"static {bits}-bit", []).append(measure(run))
        for lever in args.levers or list(LEVERS):
            run = train(
                args.out, f"dq_{lever}_s{seed}", [*QAT, *DQ, init, f"seed={seed}", *LEVERS[lever]]
            )
            rows.setdefault(f"DQ {lever}", []).append(measure(run))
            print(f"seed {seed} {lever}: {rows[f'DQ {lever}'][-1]}", flush=True)
    keys = ["top1", "bitops_rel", "rho_noise", "p90_p10", "captured"]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, found in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(spread([r.get(k) for r in found]) for k in keys) + " |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "levers.md").write_text(f"seeds {args.seeds}\n\n{table}\n")
    (args.out / "levers.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
