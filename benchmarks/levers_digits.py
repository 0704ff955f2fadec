"""Each DQ option on the digits at four noise strengths or four contrasts (tasks of known
difficulty).

From one full-precision model, static 2/3/4-bit and DQ {2,3,4} at the static 3-bit BitOPs
train on the same schedule, once per seed; DQ once with today's defaults and once per option
(:data:`LEVERS`; ``a+b`` for two together). Prints a table of means and spreads over the
seeds: top-1, BitOPs (x static 3-bit), top-1 at each level, Spearman ρ of per-image BitOPs
against the known level (noise strength or contrast), per-image BitOPs p90/p10, and the share
of the oracle's gain the controller captures.

    python benchmarks/levers_digits.py --seeds 0 1 2   # about 30 min on one CPU core
    python benchmarks/levers_digits.py --data digits_contrast --fp-epochs 8 --qat-epochs 6 \
        --levers default stats+distill_highest --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from instaquant import config as config_mod
from instaquant.builder import load_for_eval
from instaquant.controller import BitController
from instaquant.data import LEVELED_DATASETS, level_of_test_images
from instaquant.engine import fit
from instaquant.evaluation import evaluate
from instaquant.stats import line_at, spearman

QAT = ["optim.lr=0.02", "optim.weight_decay=1e-4", "reference_bits=3"]
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
    "rank": ["budget.rank_weight=1.0"],
    "controller1": ["quant.controller_epochs=1"],
    # A control, not an option: the controller's input zeroed in training and evaluation, so
    # that it cannot tell images apart (a per-layer mixed precision chosen by the budget).
    "blind": [],
}


def lever(name: str) -> list[str]:
    """The overrides of a lever, or of levers joined with ``+``; a clear error otherwise."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in LEVERS]
    if unknown:
        allowed = ", ".join(sorted(LEVERS))
        raise argparse.ArgumentTypeError(f"unknown lever {unknown[0]!r}; allowed: {allowed}")
    return [o for p in parts for o in LEVERS[p]]


def controller_input(name: str) -> contextlib.AbstractContextManager:
    """Zeroes the controller's input while a ``blind`` run trains and is measured."""
    if "blind" not in name.split("+"):
        return contextlib.nullcontext()
    features = BitController.features
    return mock.patch.object(BitController, "features", lambda c, tap: 0 * features(c, tap))


def lever_name(name: str) -> str:
    lever(name)  # refused here, with the allowed names, before anything trains
    return name


def train(out: Path, data: str, name: str, overrides: list[str]) -> Path:
    """Train (or reuse, when finished) one run; its folder."""
    run = out / name
    if not (run / "summary.json").exists():
        raw = {
            "name": name,
            "out": str(run),
            "model": {"name": "digits_net"},
            "data": {"name": data, "batch_size": 64, "eval_batch_size": 512},
        }
        fit(config_mod.from_dict(raw, overrides), progress=False, overwrite=True)
    return run


def measure(run: Path, data: str) -> dict[str, Any]:
    """Top-1 (overall and per level), BitOPs, ρ against the level and the headroom figures."""
    entry = json.loads((run / "summary.json").read_text())["runs"][0]
    row = {"top1": entry["top1"], "bitops_rel": entry.get("bitops_rel")}
    cfg, model, extra = load_for_eval(run / "last.pt")
    per = evaluate(model, extra["test_loader"], cfg.ref_bits, per_sample=True).per_sample
    right = (per["pred"] == per["label"]).double()
    levels = level_of_test_images(data, right.numel())
    for value in LEVELED_DATASETS[data]:
        row[f"top1@{value:g}"] = 100 * float(right[levels == value].mean())
    room = entry.get("headroom")
    if room is not None:
        row.update(
            rho_level=spearman(per["bitops"].double(), levels),
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
    p.add_argument("--data", choices=sorted(LEVELED_DATASETS), default="digits_noise")
    p.add_argument("--out", type=Path, help="default: runs/levers_<data>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--levers", nargs="*", type=lever_name, help="default: each alone")
    p.add_argument("--fp-epochs", type=int, default=15)
    p.add_argument("--fp-seed", type=int, default=0, help="the full-precision start's seed")
    p.add_argument("--qat-epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="small networks run best on one")
    args = p.parse_args()
    out = args.out or Path(f"runs/levers_{args.data}")
    torch.set_num_threads(args.threads)
    fp_run = ["recipe=fp", f"epochs={args.fp_epochs}", "optim.lr=0.1", f"seed={args.fp_seed}"]
    fp = train(out, args.data, "fp", fp_run)
    qat = [*QAT, f"epochs={args.qat_epochs}", f"model.init={fp}"]
    rows: dict[str, list[dict]] = {"full precision": [measure(fp, args.data)]}
    for seed in args.seeds:
        line = []  # this seed's static points, (BitOPs, top-1)
        for bits in (2, 3, 4):
            overrides = [*qat, "recipe=static", f"quant.bits=[{bits}]", f"seed={seed}"]
            run = train(out, args.data, f"static{bits}_s{seed}", overrides)
            rows.setdefault(f"static {bits}-bit", []).append(measure(run, args.data))
            line.append(
                (
                    rows[f"static {bits}-bit"][-1]["bitops_rel"],
                    rows[f"static {bits}-bit"][-1]["top1"],
                )
            )
        for name in args.levers or list(LEVERS):
            overrides = [*qat, *DQ, f"seed={seed}", *lever(name)]
            # Controller-only epochs follow the network's, which train as in the other runs.
            extra = [int(o.split("=")[1]) for o in overrides if "controller_epochs=" in o]
            overrides.append(f"epochs={args.qat_epochs + sum(extra)}")
            with controller_input(name):
                run = train(out, args.data, f"dq_{name}_s{seed}", overrides)
                row = measure(run, args.data)
            row["vs_line"] = row["top1"] - line_at(line, row["bitops_rel"])
            rows.setdefault(f"DQ {name}", []).append(row)
            print(f"seed {seed} {name}: {row}", flush=True)
    levels = [f"top1@{v:g}" for v in LEVELED_DATASETS[args.data]]
    keys = ["top1", "bitops_rel", "vs_line", *levels, "rho_level", "p90_p10", "captured"]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, found in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(spread([r.get(k) for r in found]) for k in keys) + " |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "levers.md").write_text(f"{args.data}, seeds {args.seeds}\n\n{table}\n")
    (out / "levers.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
