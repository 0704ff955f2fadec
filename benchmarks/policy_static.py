"""Static mixed precision at a DQ run's layer policy, trained like the static runs.

On CIFAR-10 ResNet-20 nearly all that DQ gains over the static line is the per-layer mix of
bits its controller settles on (docs/results.md), and its shared weights at that mix score
below static 4-bit. This trains the mix itself as a static model (``quant.layer_bits``) from
the same full-precision start, schedule and QAT seeds as ``reproduce_cifar10.py``'s static
runs, so that it meets static 3- and 4-bit on equal terms: is the mix worth its BitOPs by
itself, or only inside DQ's training? The policy is the run's ``headroom.layer_policy_bits``
(summary.json): each dynamic layer's most frequent choice on the test images, found
without their labels; the layers before the tap keep the run's fixed bits.

    python benchmarks/policy_static.py RUN --fp-init FP.pt --seeds 0 1   # 49-60 min a run, 2 CPU cores

``--distill fp`` trains with the full-precision start as a frozen teacher (DQ's runs distil from
their highest candidate, which a static model lacks): is DQ's edge at the same mix only the
teacher? ``--reference B`` trains uniform static B-bit instead of the mix, with the same
options, so that the teacher's effect on the static line is measured too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from reproduce_cifar10 import common_arguments, extract, machine_results, plan, run_all

from instaquant import config as config_mod
from instaquant.builder import build_model
from instaquant.convert import DynamicQuantModel
from instaquant.data import describe
from instaquant.demo import format_table
from instaquant.policy import static_layer_bits


def policy_of(run: Path) -> dict:
    """The quant settings of a static model at ``run``'s layer policy: its method, the fixed
    bits of the layers before the tap, the fixed weight bits if any, and ``layer_bits``."""
    summary = run / "summary.json"
    if not summary.exists():
        raise SystemExit(f"{run} has no summary.json: give a finished DQ run folder")
    room = json.loads(summary.read_text())["runs"][0].get("headroom") or {}
    if "layer_policy_bits" not in room:
        raise SystemExit(
            f"{run}'s summary.json records no layer policy (a static run, or a DQ run measured "
            "before the policy was recorded: benchmarks/per_layer_policy.py measures one)"
        )
    cfg = config_mod.load(run / "config.yaml")
    info = describe(cfg.data, absent_classes=10)
    model = build_model(cfg, info, torch.device("cpu"), load_init=False)
    assert isinstance(model, DynamicQuantModel)
    chosen_w, chosen_a = room["layer_policy_bits"]
    layer_bits = static_layer_bits((chosen_w, chosen_a), model)
    if layer_bits is None:
        raise SystemExit(f"{run}'s policy gives weights and activations different bits")
    quant = {"method": model.spec.method, "bits": [model.spec.fixed_bits], "layer_bits": layer_bits}
    if model.spec.weight_bits is not None:
        quant["weight_bits"] = model.spec.weight_bits
    return quant


def policy_plan(
    runs: list[dict],
    out: Path,
    quant: dict | int,
    tag: str,
    seeds: list[int],
    distill: str = "none",
) -> list[dict]:
    """Static at ``quant`` (an int: uniform static at that many bits, a reference) once per QAT
    seed, all else as the main table's static 4-bit run; ``distill="fp"`` adds the
    full-precision teacher and ``+distill_fp`` to the names."""
    base = next(r for r in runs if r["name"].endswith("_static4"))
    method = base["quant"]["method"]
    if isinstance(quant, int):
        name, quant = f"{method}_static{quant}", {**base["quant"], "bits": [quant]}
    else:
        name = f"{method}_static_policy_{tag}"
    extra = {} if distill == "none" else {"distill": {"teacher": distill}}
    name += "" if distill == "none" else f"+distill_{distill}"
    plans = []
    for seed in seeds:
        seeded = name + (f"_seed{seed}" if seed else "")
        run = {**base, **extra, "name": seeded, "out": str(out / seeded), "seed": seed}
        plans.append({**run, "quant": quant})
    return plans


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` replacing those of the same name in ``path``'s runs: runs of one tag trained by
    separate processes (one per seed) share the file."""
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    names = {r["name"] for r in rows}
    return [r for r in old if r["name"] not in names] + rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished DQ run folder (summary.json, config.yaml)")
    common_arguments(p, Path("runs/reproduce_cifar10"))
    p.add_argument("--fp-init", type=Path, required=True, help="the full-precision start")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="QAT seeds")
    p.add_argument("--tag", help="names the runs pact_static_policy_TAG[_seedS]; default: run's")
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument(
        "--distill", choices=["none", "fp"], default="none", help="teacher (default none)"
    )
    p.add_argument(
        "--reference", type=int, choices=range(2, 9), metavar="B", help="train static B-bit instead"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quant = policy_of(args.run)
    bits = ", ".join(f"{name} {b}" for name, b in quant["layer_bits"].items())
    print(f"the layer policy of {args.run.name}: {bits}; other layers at {quant['bits'][0]}")
    root = args.root or extract(args.archive, args.data_dir)
    runs = plan(root, args.out, "learn", [quant["method"]], args.limit, args.fp_init)
    tag = args.tag or args.run.name
    plans = policy_plan(runs, args.out, args.reference or quant, tag, args.seeds,
                        args.distill)  # fmt: skip
    entries = run_all(plans, args.progress, not args.tables_only)
    if not entries:
        raise SystemExit("no run has finished yet: nothing to tabulate")
    print(format_table(entries))
    path = args.out / f"policy_static_{tag}.json"
    rows = merged(path, machine_results(entries))
    path.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
