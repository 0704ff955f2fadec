"""Reproduce the paper's CIFAR-10 ResNet-20 comparison (Table 1): static DoReFa/PACT vs DQ.

Runs, in order, into ``--out``: full-precision ResNet-20 (or, with ``--fp-init``, none: every
quantized run starts from the given model); static QAT at 3 and 4 bits for each method; DQ
with candidates {b-1, b, b+1} at the BitOPs of static b-bit for b = 3 and b = 4; static 2 and
5 bits; all with the same initialisation, schedule and seed. Every run resumes from its
checkpoint when the script is started again, and finished runs are skipped. At the end it
prints the table and writes ``results.md`` (with the DQ runs' headroom), ``results.json``,
``cifar10.json`` (the figures in the form of docs/results/cifar10.json) and the
accuracy-vs-BitOPs plot into ``--out``.

    python benchmarks/reproduce_cifar10.py --learn --fp-init FP.pt   # 6 QAT epochs, PACT
    python benchmarks/reproduce_cifar10.py --learn --fp-init FP.pt --levers   # + one DQ run per option
    python benchmarks/reproduce_cifar10.py --learn --fp-init FP.pt --static-seeds 1 2   # + static 3/4-bit per seed (static_seeds.md)
    python benchmarks/reproduce_cifar10.py --quick   # 15 fp + 2 QAT epochs, about 100 min
    python benchmarks/reproduce_cifar10.py --paper   # the full schedules (a GPU)
    python benchmarks/reproduce_cifar10.py --quick --ablations   # + about 35 min of PACT runs
    python benchmarks/reproduce_cifar10.py --learn --fp-init FP.pt --tables-only   # no training
    # one run per process, two at once on 2 cores (here LSQ static 3-bit and an LSQ DQ option)
    python benchmarks/reproduce_cifar10.py --learn --fp-init FP.pt --methods lsq --levers stats \
        --only lsq_static3 --threads 1

Data: ``--archive`` (the CIFAR-10 JPEG tarball in ImageFolder layout, extracted once to
``--data-dir``) or ``--root`` (an extracted ``train/`` + ``test/`` folder).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

from instaquant import config as config_mod
from instaquant.checkpoint import load_checkpoint
from instaquant.demo import format_table
from instaquant.engine import fit
from instaquant.report import plot_accuracy_vs_bitops

REPO = Path(__file__).resolve().parent.parent

# Epochs and learning rates per schedule. "quick" is sized for 2 CPU cores; "paper"
# follows the usual CIFAR ResNet-20 recipe (200 fp epochs, then 90 QAT epochs).
SCHEDULES: dict[str, dict[str, Any]] = {
    "quick": {
        "fp": {"epochs": 15, "optim": {"lr": 0.2, "schedule": "onecycle", "weight_decay": 5e-4}},
        "qat": {"epochs": 2, "optim": {"lr": 0.01, "schedule": "cosine", "weight_decay": 1e-4}},
    },
    # From a given full-precision model (--fp-init): QAT long enough for the controller to
    # learn; the main PACT table takes about 100 min on 2 CPU cores.
    "learn": {
        "fp": None,
        "qat": {"epochs": 6, "optim": {"lr": 0.01, "schedule": "cosine", "weight_decay": 1e-4}},
    },
    "paper": {
        "fp": {"epochs": 200, "optim": {"lr": 0.1, "schedule": "cosine", "weight_decay": 1e-4}},
        "qat": {"epochs": 90, "optim": {"lr": 0.01, "schedule": "cosine", "weight_decay": 1e-4}},
    },
}


# The static runs the DQ budgets are compared with come first, then DQ, then the other ends
# of the static line: a schedule cut short still has the comparisons that matter.
FIRST_STATIC, LAST_STATIC = (3, 4), (2, 5)
# One DQ option each, at the 3-bit budget (candidates 2, 3, 4), for --levers, as config
# sections ("run": top-level keys). ``budget070`` instead moves the budget to 0.70x static
# 4-bit's BitOPs (3.35² / 4²), so that a run landing a few percent above its budget (as the
# 3-bit ones do) stays within 0.75x; ``budget075`` at 0.744x (3.45² / 4²) is as close to the
# 0.75x edge as that allows; ``seed1`` and ``seed2`` repeat a run with other QAT seeds; ``rank``
# ranks the images' expected BitOPs by how much bits lower their loss (budget.rank_weight);
# ``controller1`` adds one epoch that trains only the controller, on the frozen network;
# ``weights4`` fixes every weight at 4 bits, so the candidates and the budget are activation
# bits and BitOPs grow linearly with them (the 3-bit budget is then 0.75x static 4-bit), and
# ``budget_a288`` with it aims at 0.72x (4 · 2.88 / 16), as budget070 leaves room to overshoot,
# ``budget_a297`` at 0.7425x, as budget075 just inside the 0.75x edge;
# ``weights3`` fixes them at 3 bits, so its 3-bit budget is exactly static 3-bit's BitOPs;
# ``bits345`` gives the dynamic layers the candidates {3, 4, 5} (the highest then teaches at 5
# bits) and keeps the layers before the tap at 3 bits, as {2, 3, 4} does, so that a 0.70x budget
# stays feasible: there the 2-bit candidate is rarely chosen and 5 bits can be.
LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "grid4": {"quant": {"controller_grid": 4}},
    "stats": {"quant": {"controller_stats": True}},
    "candidate_bn": {"quant": {"candidate_bn": True}},
    "distill_fp": {"distill": {"teacher": "fp"}},
    "distill_highest": {"distill": {"teacher": "highest"}},
    "warmup": {"quant": {"random_epochs": 2}},
    "controller_lr10": {"optim": {"controller_lr_scale": 10.0}},
    "budget070": {"budget": {"target_bits": 3.35}},
    "budget075": {"budget": {"target_bits": 3.45}},
    "seed1": {"run": {"seed": 1}},
    "seed2": {"run": {"seed": 2}},
    "rank": {"budget": {"rank_weight": 1.0}},
    "controller1": {"quant": {"controller_epochs": 1}},
    "weights4": {"quant": {"weight_bits": 4}},
    "weights3": {"quant": {"weight_bits": 3}},
    "budget_a288": {"budget": {"target_bits": 2.88}},
    "budget_a297": {"budget": {"target_bits": 2.97}},
    "bits345": {"quant": {"bits": [3, 4, 5], "fixed_bits": 3}},
}
# The static line of ``weights4``: weights at 4 bits, activations at these (4 is pact_static4).
WEIGHTS4_STATIC = (2, 3)


def lever_name(name: str) -> str:
    """A ``--levers`` entry: one of :data:`LEVERS`, or several joined with ``+``."""
    unknown = [part for part in name.split("+") if part not in LEVERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown lever {unknown[0]!r} in {name!r}; allowed: {', '.join(sorted(LEVERS))} "
            "(join with + to combine)"
        )
    return name


def extract(archive: Path, data_dir: Path) -> Path:
    """Extract the tarball once; returns the folder holding train/ and test/."""
    marker = data_dir / ".extracted"
    if not marker.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"extracting {archive} to {data_dir} ...", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
        marker.write_text(str(archive))
    for candidate in (data_dir, *sorted(p for p in data_dir.iterdir() if p.is_dir())):
        if (candidate / "train").is_dir():
            return candidate
    raise SystemExit(f"no train/ folder found under {data_dir}")


def plan(
    root: Path,
    out: Path,
    schedule: str,
    methods: list[str],
    limit: int | None,
    fp_init: Path | None = None,
) -> list[dict]:
    """Config dicts of every run, in the order they must run.

    With ``fp_init`` (a full-precision ResNet-20 checkpoint of ours) there is no fp run:
    every quantized run starts from that model.
    """
    sched = SCHEDULES[schedule]
    data = {"name": "imagefolder", "root": str(root), "image_size": 32, "batch_size": 128}
    if limit:
        data["limit"] = limit

    def run(name: str, **kw: Any) -> dict:
        return {"name": name, "out": str(out / name), "seed": 0, "data": data, **kw}

    runs = []
    if fp_init is None:
        if sched["fp"] is None:
            raise SystemExit(f"the {schedule!r} schedule starts from --fp-init PATH: give one")
        runs.append(run("fp", recipe="fp", model={"name": "resnet20"}, **sched["fp"]))
    init = {"name": "resnet20", "init": str(fp_init or out / "fp")}

    def static_run(method: str, bits: int) -> dict:
        return run(
            f"{method}_static{bits}",
            recipe="static",
            model=init,
            quant={"method": method, "bits": [bits]},
            reference_bits=4,
            **sched["qat"],
        )

    runs += [static_run(m, b) for m in methods for b in FIRST_STATIC]
    runs += [dq_run(run, m, b, init, sched["qat"]) for m in methods for b in (3, 4)]
    runs += [static_run(m, b) for m in methods for b in LAST_STATIC]
    return runs


def dq_run(run: Any, method: str, budget: int, init: dict, qat: dict) -> dict:
    """DQ with candidates {b-1, b, b+1} at the BitOPs of static b-bit."""
    return run(
        f"{method}_dq_budget{budget}",
        recipe="dynamic",
        model=init,
        quant={
            "method": method,
            "bits": [budget - 1, budget, budget + 1],
            "tap": "layer1",
            "tau": 1.0,
            "tau_final": 0.2,
        },
        budget={"kind": "bitops", "target_bits": budget, "weight": 2.0},
        reference_bits=4,
        **qat,
    )


def lever_plan(runs: list[dict], out: Path, names: list[str], method: str = "pact") -> list[dict]:
    """``method``'s DQ at the 3-bit budget once per named lever (:data:`LEVERS`), all else equal.

    A name joining levers with ``+`` (``candidate_bn+warmup``) is one run with all of them.
    """
    base = next(r for r in runs if r["name"] == f"{method}_dq_budget3")
    plans = []
    for name in names:
        run = {
            **base,
            "name": f"{method}_dq_budget3_{name}",
            "out": str(out / f"{method}_dq_budget3_{name}"),
        }
        for part in name.split("+"):
            for section, changes in LEVERS[part].items():
                if section == "run":
                    run.update(changes)
                else:
                    run[section] = {**run.get(section, {}), **changes}
        # Controller-only epochs follow the schedule's, so the network trains as in the base.
        run["epochs"] = base["epochs"] + run["quant"].get("controller_epochs", 0)
        plans.append(run)
    return plans


def static_seed_plan(
    runs: list[dict], out: Path, seeds: list[int], method: str = "pact"
) -> list[dict]:
    """``method``'s static 3- and 4-bit once per QAT seed, all else as the main table's: the
    static line of the seeds that ``seed1`` and ``seed2`` train DQ with, so that DQ and static
    compare on the same seed."""
    by_name = {r["name"]: r for r in runs}
    plans = []
    for seed in seeds:
        for bits in FIRST_STATIC:
            name = f"{method}_static{bits}_seed{seed}"
            base = by_name[f"{method}_static{bits}"]
            plans.append({**base, "name": name, "out": str(out / name), "seed": seed})
    return plans


def weights4_static_plan(runs: list[dict], out: Path, seeds: list[int]) -> list[dict]:
    """PACT static with 4-bit weights and 2- or 3-bit activations once per QAT seed, all else
    as the main table's: with pact_static4 (and pact_static4_seed<s>), the static line that
    ``weights4`` DQ runs compare with."""
    base = next(r for r in runs if r["name"] == "pact_static4")
    plans = []
    for seed in seeds:
        for bits in WEIGHTS4_STATIC:
            name = f"pact_static{bits}_w4" + (f"_seed{seed}" if seed else "")
            quant = {**base["quant"], "bits": [bits], "weight_bits": 4}
            run = {**base, "name": name, "out": str(out / name), "quant": quant, "seed": seed}
            plans.append(run)
    return plans


def ablation_plan(runs: list[dict], out: Path, schedule: str) -> list[dict]:
    """PACT runs that test why DQ does not beat static 4-bit on the quick schedule.

    - ``pact_dq_budget4_shared``: one clip α (and weight grid) shared by the candidates, so
      every batch trains it (per-candidate parameters see only their share of the batches);
    - ``pact_static4_qat2x`` and ``pact_dq_budget4_qat2x``: both with twice the QAT epochs
      (is two epochs too short for the controller and the three branches?).
    """
    by_name = {r["name"]: r for r in runs}
    static4, dq4 = by_name["pact_static4"], by_name["pact_dq_budget4"]

    def variant(base: dict, suffix: str, **changes: Any) -> dict:
        run = {**base, **changes, "name": f"{base['name']}_{suffix}"}
        run["out"] = str(out / run["name"])
        return run

    longer = 2 * SCHEDULES[schedule]["qat"]["epochs"]
    return [
        variant(dq4, "shared", quant={**dq4["quant"], "share": True}),
        variant(static4, "qat2x", epochs=longer),
        variant(dq4, "qat2x", epochs=longer),
    ]


def run_all(
    raws: list[dict], progress: bool, train: bool = True, only: set[str] | None = None
) -> list[dict]:
    """Train (or resume, or skip when finished) each run; their summary entries. With
    ``train=False`` only the finished runs' entries, nothing trained; with ``only`` just the
    named runs are trained (another process may be training the rest)."""
    entries = []
    for raw in raws:
        cfg = config_mod.from_dict(raw)
        summary = Path(cfg.out) / "summary.json"
        if summary.exists():
            print(f"== {cfg.name}: done before, skipped", flush=True)
        elif not train or (only is not None and cfg.name not in only):
            print(f"== {cfg.name}: not finished, left out of the tables", flush=True)
            continue
        else:
            resume = (Path(cfg.out) / "last.pt").exists()
            print(f"== {cfg.name}: {'resuming' if resume else 'training'}", flush=True)
            fit(cfg, resume=resume, progress=progress)
        entries.append(json.loads(summary.read_text())["runs"][0])
    return entries


def machine_results(entries: list[dict]) -> list[dict]:
    """One object per run in the form of docs/results/cifar10.json: BitOPs relative to static
    4-bit; DQ runs with their per-image spread and headroom (see instaquant.headroom)."""
    rows = []
    for e in entries:
        row = {k: e.get(k) for k in ("name", "recipe", "method", "bits", "top1", "bitops_rel")}
        if e.get("weight_bits") is not None:  # bits are then the activations'
            row["weight_bits"] = e["weight_bits"]
        if e.get("layer_bits"):  # static mixed precision: these layers at their own bits
            row["layer_bits"] = e["layer_bits"]
        room = e.get("headroom")
        if room is not None:
            row.update(
                budget_bits=e.get("budget_bits"),
                bitops_p10=room["bitops_p10_rel"],
                bitops_p90=room["bitops_p90_rel"],
                rho_fp_loss=room["rho_fp_loss"],
                oracle_top1=room["oracle_top1"],
                oracle_bitops_rel=room["oracle_bitops_rel"],
                monotone_oracle_top1=room["monotone_oracle_top1"],
                monotone_oracle_bitops_rel=room["monotone_oracle_bitops_rel"],
                captured_share=room["captured_share"],
                ranked_top1={k: v["top1"] for k, v in room.get("ranked_top1", {}).items()},
                uniform_top1=room["uniform_top1"],
                uniform_bitops_rel=room["uniform_bitops_rel"],
            )
            if "layer_policy_top1" in room:  # runs measured before it was recorded lack it
                row.update(
                    layer_policy_top1=room["layer_policy_top1"],
                    layer_policy_bitops_rel=room["layer_policy_bitops_rel"],
                )
        rows.append(row)
    return rows


def headroom_table(entries: list[dict]) -> str:
    """The DQ runs' headroom as a markdown table."""
    lines = [
        "| run | top-1 % | BitOPs | p90/p10 | ρ(fp loss) | uniform top-1 % | oracle | "
        "monotone oracle | captured | ranked by fp loss / cheapest confidence |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for e in entries:
        r = e.get("headroom")
        if r is None:
            continue
        uniform = " / ".join(f"{t:.2f}" for t in r["uniform_top1"])
        rho = "-" if r["rho_fp_loss"] is None else f"{r['rho_fp_loss']:+.3f}"
        cap = "-" if r["captured_share"] is None else f"{100 * r['captured_share']:.0f}%"
        lines.append(
            f"| {e['name']} | {e['top1']:.2f} | {e['bitops_rel']:.3f}x | "
            f"{r['bitops_p90_over_p10']:.2f} | {rho} | {uniform} | "
            f"{r['oracle_top1']:.2f}% at {r['oracle_bitops_rel']:.3f}x | "
            f"{r['monotone_oracle_top1']:.2f}% at {r['monotone_oracle_bitops_rel']:.3f}x | {cap} | "
            f"{_ranked_cell(r)} |"
        )
    return "\n".join(lines)


def _ranked_cell(room: dict) -> str:
    """The fp-loss and cheapest-confidence ranked allocations (see instaquant.headroom)."""
    ranked = room.get("ranked_top1", {})
    cells = [
        f"{ranked[k]['top1']:.2f} ({ranked[k]['bits'][0]}+{ranked[k]['bits'][1]})"
        for k in ("fp_loss", "cheapest_confidence")
        if k in ranked
    ]
    return " / ".join(cells) or "-"


def fp_entry(path: Path) -> dict:
    """The table's full-precision row from the checkpoint the quantized runs started from."""
    ckpt = load_checkpoint(path)
    top1 = ckpt["metrics"].get("test_top1")
    return {
        "name": "fp",
        "recipe": "fp",
        "method": None,
        "bits": None,
        "top1": top1,
        "bitops_rel": None,
        "init": str(path),
    }


def common_arguments(p: argparse.ArgumentParser, out: Path) -> None:
    """The data, output and run-control options every CIFAR-10 benchmark here takes."""
    p.add_argument("--archive", type=Path, default=REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".cache/instaquant/cifar10-jpeg")
    p.add_argument("--root", type=Path, help="an extracted train/ + test/ folder")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--limit", type=int, help="images per split (smoke tests)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument(
        "--tables-only", action="store_true", help="tables of the finished runs; train nothing"
    )


def all_plans(
    args: argparse.Namespace, root: Path, schedule: str
) -> tuple[list[dict], list[dict], list[dict], list[dict], list[dict]]:
    """The main table's runs, then those of ``--levers``, ``--static-seeds``,
    ``--weights4-static`` and ``--ablations`` (empty lists where not asked for), in the order
    they train."""
    runs = plan(root, args.out, schedule, args.methods, args.limit, args.fp_init)
    names = (args.levers or sorted(LEVERS)) if args.levers is not None else []
    lever_runs = [r for m in args.methods for r in lever_plan(runs, args.out, names, m)]
    seeds = args.static_seeds or []
    seed_runs = [r for m in args.methods for r in static_seed_plan(runs, args.out, seeds, m)]
    w4_seeds = args.weights4_static
    weights4_runs = (
        [] if w4_seeds is None else weights4_static_plan(runs, args.out, w4_seeds or [0])
    )
    ablation_runs = ablation_plan(runs, args.out, schedule) if args.ablations else []
    return runs, lever_runs, seed_runs, weights4_runs, ablation_runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="short schedule for 2 CPU cores")
    mode.add_argument(
        "--learn", action="store_true", help="6 QAT epochs from --fp-init (about 100 min, PACT)"
    )
    mode.add_argument("--paper", action="store_true", help="full schedules (GPU)")
    common_arguments(p, Path("runs/reproduce_cifar10"))
    p.add_argument("--methods", nargs="+", help="default: pact with --learn, else dorefa pact")
    p.add_argument(
        "--fp-init",
        type=Path,
        help="a full-precision ResNet-20 checkpoint (run folder or .pt) to start every "
        "quantized run from, instead of training one",
    )
    p.add_argument(
        "--levers",
        nargs="*",
        type=lever_name,
        help="then each method's DQ at the 3-bit budget once per named option (all when none "
        "named); "
        f"options: {', '.join(sorted(LEVERS))}; join with + to combine (candidate_bn+warmup); "
        "budget070 and budget075 move the budget to 0.70x and 0.744x static 4-bit's BitOPs, "
        "seed1 and seed2 change the seed",
    )
    p.add_argument(
        "--static-seeds",
        nargs="+",
        type=int,
        help="then each method's static 3- and 4-bit once per given QAT seed (the static line "
        "of seed1 and seed2)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="train only the named runs (to train two at once, one per process); the other "
        "finished runs still enter the tables",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument(
        "--weights4-static",
        nargs="*",
        type=int,
        metavar="SEED",
        help="then PACT static with 4-bit weights and 2- or 3-bit activations once per given "
        "QAT seed (none given: seed 0), the static line of the weights4 lever",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="then PACT runs testing why DQ loses on the schedule (shared α, twice the epochs)",
    )
    args = p.parse_args()
    args.methods = args.methods or (["pact"] if args.learn else ["dorefa", "pact"])
    if args.learn and args.fp_init is None:
        p.error("--learn starts from a trained full-precision model: give --fp-init PATH")
    if args.weights4_static is not None and "pact" not in args.methods:
        p.error("--weights4-static trains PACT static runs: include pact in --methods")
    if args.ablations and "pact" not in args.methods:
        # Checked before the main runs, not after hours of training.
        p.error("--ablations varies the PACT runs: include pact in --methods")

    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = "quick" if args.quick else "learn" if args.learn else "paper"
    only = set(args.only) if args.only else None
    if only is not None:  # run names do not depend on where the data lies: check before extracting
        known = {r["name"] for plans in all_plans(args, args.data_dir, schedule) for r in plans}
        if only - known:
            p.error(
                f"--only names no planned run: {', '.join(sorted(only - known))}; "
                f"planned: {', '.join(sorted(known))}"
            )
    root = args.root or extract(args.archive, args.data_dir)
    t0 = time.time()
    runs, lever_runs, seed_runs, weights4_runs, ablation_runs = all_plans(args, root, schedule)
    train = not args.tables_only
    entries = run_all(runs, args.progress, train, only)
    args.out.mkdir(parents=True, exist_ok=True)  # with --only, no run of this table may make it
    if args.fp_init is not None:
        entries.insert(0, fp_entry(args.fp_init))
    wall = time.time() - t0
    table = format_table(entries)
    print(table)
    (args.out / "results.json").write_text(
        json.dumps({"schedule": schedule, "runs": entries}, indent=2)
    )
    lever_entries = run_all(lever_runs, args.progress, train, only)
    seed_entries = run_all(seed_runs, args.progress, train, only)
    weights4_entries = run_all(weights4_runs, args.progress, train, only)
    (args.out / "cifar10.json").write_text(
        json.dumps(
            {"runs": machine_results([*entries, *lever_entries, *seed_entries, *weights4_entries])},
            indent=2,
        )
    )
    if weights4_entries:
        # 4-bit weights throughout: a line of its own, with the DQ runs that fix weights too.
        static4 = [e for e in [*entries, *seed_entries] if e["name"].startswith("pact_static4")]
        fixed = [e for e in lever_entries if e.get("weight_bits") == 4]
        table = format_table([*weights4_entries, *static4, *fixed])
        print(table)
        (args.out / "weights4.md").write_text(f"```\n{table}\n```\n")
    if seed_entries:
        # A table of their own: on the plots they would join seed 0's static line.
        table = format_table(seed_entries)
        print(table)
        (args.out / "static_seeds.md").write_text(f"```\n{table}\n```\n")
    plot = plot_accuracy_vs_bitops(
        entries, args.out / "accuracy_vs_bitops.png", f"CIFAR-10 ResNet-20 ({schedule} schedule)"
    )
    (args.out / "results.md").write_text(
        f"```\n{table}\n```\n\nschedule: {schedule}; this invocation's wall time {wall / 60:.1f} min; "
        f"per-run wall times are in results.json (wall_s)\n\n"
        f"{headroom_table([*entries, *lever_entries])}\n"
    )
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'} and {plot}")
    if lever_entries:
        base = {e["name"]: e for e in entries}
        keep = [
            base[f"{m}_{run}"]
            for m in args.methods
            for run in ("static3", "dq_budget3")
            if f"{m}_{run}" in base
        ]
        table = format_table([*keep, *lever_entries])
        print(table)
        (args.out / "levers.json").write_text(
            json.dumps({"schedule": schedule, "runs": lever_entries}, indent=2)
        )
        (args.out / "levers.md").write_text(f"```\n{table}\n```\n")
        # Zoomed on the static 3- to 4-bit segment, where the options' runs land.
        shown = [
            base[f"{m}_{run}"]
            for m in args.methods
            for run in ("static3", "static4", "dq_budget3")
            if f"{m}_{run}" in base
        ]
        plot = plot_accuracy_vs_bitops(
            [*shown, *lever_entries],
            args.out / "levers_accuracy_vs_bitops.png",
            f"CIFAR-10 ResNet-20 ({schedule} schedule): DQ options",
        )
        print(f"wrote {args.out / 'levers.md'}, {args.out / 'levers.json'} and {plot}")
    if args.ablations:
        base = {e["name"]: e for e in entries}
        extra = run_all(ablation_runs, args.progress, train, only)
        shown = [base[n] for n in ("pact_static4", "pact_dq_budget4") if n in base]
        table = format_table([*shown, *extra])
        print(table)
        (args.out / "ablations.json").write_text(
            json.dumps({"schedule": schedule, "runs": extra}, indent=2)
        )
        (args.out / "ablations.md").write_text(f"```\n{table}\n```\n")
        print(f"wrote {args.out / 'ablations.md'} and {args.out / 'ablations.json'}")


if __name__ == "__main__":
    main()
