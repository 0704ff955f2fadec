"""Each DQ option on the digits at four noise strengths or four contrasts (tasks of known
difficulty).

From one full-precision model, static 2/3/4-bit and DQ {2,3,4} at the static 3-bit BitOPs
train on the same schedule, once per seed; DQ once with today's defaults and once per option
(:data:`LEVERS`; ``a+b`` for two together). Prints a table of means and spreads over the
seeds: top-1, BitOPs (x static 3-bit), top-1 at each level, Spearman ρ of per-image BitOPs
against the known level (noise strength or contrast), per-image BitOPs p90/p10, and the share
of the oracle's gain the controller captures. The "level oracle" row is the best the static
models could do knowing every test image's level (:func:`level_oracle`). ``--bits 1 2 3``
trains other bit-widths; the budget is always the middle one's BitOPs. ``--weight-bits 4``
fixes the weights of every quantized run at 4 bits, so that only activations choose and a bit
costs the same whichever level takes it; ``--budget-bits 1.5`` then sets DQ's budget apart from
the middle one. ``--static-teacher`` also trains the two lower static models with the highest
one as a frozen teacher (``distill.teacher=checkpoint``), the static counterpart of DQ's
``distill_highest``, and scores DQ against their line too.

    python benchmarks/levers_digits.py --seeds 0 1 2   # about 30 min on one CPU core
    python benchmarks/levers_digits.py --data digits_contrast --fp-epochs 8 --qat-epochs 6 \
        --levers default stats+distill_highest --seeds 0 1 2 3 4
    python benchmarks/levers_digits.py --data digits_mixed --fp-epochs 20 --qat-epochs 10 \
        --bits 1 2 3 --weight-bits 4 --levers stats+distill_highest stats+distill_highest+blind
    python benchmarks/levers_digits.py --data digits_mixed --fp-epochs 20 --qat-epochs 10 \
        --bits 1 2 3 --weight-bits 4 --budget-bits 1.5 --static-teacher \
        --levers stats+distill_highest stats+distill_highest+blind
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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

QAT = ["optim.lr=0.02", "optim.weight_decay=1e-4"]
DQ = [
    "recipe=dynamic",
    "quant.tau_final=0.2",
    "budget.weight=2.0",
]


def candidate_overrides(
    bits: list[int], budget_bits: float | None = None
) -> tuple[list[str], list[str]]:
    """For three bit-widths: every run's BitOPs reference (the middle one), and DQ's candidates
    and budget (``budget_bits``, by default the middle one: ``[2, 3, 4]`` spend static 3-bit's
    BitOPs, as in the tables of docs/results.md)."""
    if len(set(bits)) != 3:
        raise ValueError(f"--bits needs three distinct bit-widths, got {bits}")
    low, middle, high = sorted(bits)
    budget = middle if budget_bits is None else budget_bits
    if not low <= budget <= high:
        raise ValueError(f"--budget-bits {budget} is outside the candidates' {low}..{high}")
    reference = [f"reference_bits={middle}"]
    return reference, [f"quant.bits=[{low},{middle},{high}]", f"budget.target_bits={budget:g}"]


def qat_overrides(
    fp: Path, epochs: int, reference: list[str], weight_bits: int | None = None
) -> list[str]:
    """What every quantized run shares: the start, the schedule, the BitOPs reference and,
    with ``weight_bits``, the weights fixed at that many bits (the bits then activations')."""
    shared = [*QAT, *reference, f"epochs={epochs}", f"model.init={fp}"]
    return shared if weight_bits is None else [*shared, f"quant.weight_bits={weight_bits}"]


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


def level_oracle(
    static: dict[int, tuple[float, list[float]]], budget: float
) -> tuple[float, float]:
    """What knowing each test image's level could buy with the static models: (top-1, BitOPs).

    ``static`` maps bit-width to (BitOPs, top-1 at each level); the levels are equal shares of
    the test set. Every level runs at one static model's bit-width, and two such assignments
    mix (a share of one level's images at each) to spend ``budget``: the upper concave hull of
    all assignments at the budget, the best allocation by level alone, weights trained apart.
    """
    n_levels = len(next(iter(static.values()))[1])
    points = []
    for assignment in itertools.product(static, repeat=n_levels):
        cost = sum(static[b][0] for b in assignment) / n_levels
        top1 = sum(static[b][1][i] for i, b in enumerate(assignment)) / n_levels
        points.append((cost, top1))
    best = max(((c, t) for c, t in points if c <= budget), key=lambda p: (p[1], -p[0]))
    for (c0, t0), (c1, t1) in itertools.product(points, repeat=2):
        if c0 < budget < c1:
            top1 = t0 + (budget - c0) / (c1 - c0) * (t1 - t0)
            if top1 > best[1]:
                best = (budget, top1)
    return best[1], best[0]


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
    p.add_argument(
        "--bits",
        type=int,
        nargs=3,
        default=[2, 3, 4],
        help="static bit-widths and DQ's candidates (default 2 3 4); budget: the middle one",
    )
    p.add_argument(
        "--weight-bits",
        type=int,
        choices=range(1, 9),
        metavar="1..8",
        help="fix every quantized weight at these bits in every run, so that --bits name the "
        "activations' and BitOPs grow linearly with them (default: weights choose with them)",
    )
    p.add_argument(
        "--static-teacher",
        action="store_true",
        help="also train the two lower static models taught by the highest one "
        "(distill.teacher=checkpoint), and score DQ against their line too",
    )
    p.add_argument(
        "--budget-bits",
        type=float,
        help="DQ's budget: static BitOPs at this many activation bits, between the lowest and "
        "highest of --bits (needs --weight-bits, which makes BitOPs linear in them; default: "
        "the middle one)",
    )
    args = p.parse_args()
    if args.budget_bits is not None and args.weight_bits is None:
        p.error("--budget-bits needs --weight-bits (BitOPs are then linear in the bits)")
    try:  # refused before anything trains
        reference, candidates = candidate_overrides(args.bits, args.budget_bits)
    except ValueError as err:
        p.error(str(err))
    out = args.out or Path(f"runs/levers_{args.data}")
    torch.set_num_threads(args.threads)
    fp_run = ["recipe=fp", f"epochs={args.fp_epochs}", "optim.lr=0.1", f"seed={args.fp_seed}"]
    fp = train(out, args.data, "fp", fp_run)
    qat = qat_overrides(fp, args.qat_epochs, reference, args.weight_bits)
    rows: dict[str, list[dict]] = {"full precision": [measure(fp, args.data)]}
    levels = [f"top1@{v:g}" for v in LEVELED_DATASETS[args.data]]
    for seed in args.seeds:
        static = {}  # bit-width: this seed's static model, measured
        for bits in sorted(args.bits):
            overrides = [*qat, "recipe=static", f"quant.bits=[{bits}]", f"seed={seed}"]
            static[bits] = measure(
                train(out, args.data, f"static{bits}_s{seed}", overrides), args.data
            )
            rows.setdefault(f"static {bits}-bit", []).append(static[bits])
        line = [(r["bitops_rel"], r["top1"]) for r in static.values()]
        taught_line = None
        if args.static_teacher:  # DQ's highest candidate teaches; so may the static model's
            high = max(args.bits)
            teacher = [
                "distill.teacher=checkpoint",
                f"distill.checkpoint={out / f'static{high}_s{seed}'}",
            ]
            taught_line = [(static[high]["bitops_rel"], static[high]["top1"])]
            for bits in sorted(args.bits)[:2]:
                overrides = [*qat, "recipe=static", f"quant.bits=[{bits}]", f"seed={seed}"]
                name = f"static{bits}_taught_s{seed}"
                row = measure(train(out, args.data, name, [*overrides, *teacher]), args.data)
                rows.setdefault(f"static {bits}-bit taught by {high}-bit", []).append(row)
                taught_line.append((row["bitops_rel"], row["top1"]))
        per_level = {b: (r["bitops_rel"], [r[k] for k in levels]) for b, r in static.items()}
        # The budget: the static BitOPs at --budget-bits (by default the middle model's, 1.0
        # unless --weight-bits moves the reference off it); with weights fixed, BitOPs are
        # linear in the activation bits, so the static points' line gives it exactly.
        bits_line = [(b, static[b]["bitops_rel"]) for b in sorted(args.bits)]
        budget = line_at(bits_line, args.budget_bits or sorted(args.bits)[1])
        top1, bitops = level_oracle(per_level, budget)
        oracle = {"top1": top1, "bitops_rel": bitops, "vs_line": top1 - line_at(line, bitops)}
        rows.setdefault("level oracle (static models)", []).append(oracle)
        for name in args.levers or list(LEVERS):
            overrides = [*qat, *DQ, *candidates, f"seed={seed}", *lever(name)]
            # Controller-only epochs follow the network's, which train as in the other runs.
            extra = [int(o.split("=")[1]) for o in overrides if "controller_epochs=" in o]
            overrides.append(f"epochs={args.qat_epochs + sum(extra)}")
            with controller_input(name):
                run = train(out, args.data, f"dq_{name}_s{seed}", overrides)
                row = measure(run, args.data)
            row["vs_line"] = row["top1"] - line_at(line, row["bitops_rel"])
            if taught_line is not None:
                row["vs_taught_line"] = row["top1"] - line_at(taught_line, row["bitops_rel"])
            rows.setdefault(f"DQ {name}", []).append(row)
            print(f"seed {seed} {name}: {row}", flush=True)
    taught = ["vs_taught_line"] if args.static_teacher else []
    keys = ["top1", "bitops_rel", "vs_line", *taught, *levels, "rho_level", "p90_p10", "captured"]
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
