"""How much an oracle gets where no bits change: runs that differ only in their seed.

The headroom oracle (:mod:`instaquant.headroom`) gives each test image the cheapest
candidate of one DQ model's shared weights that classifies it correctly, and reads as a
large prize. But any two models that answer differently near the decision boundaries give
such an oracle a prize, whether or not one of them has more bits. This script measures both
kinds on the same test set:

- *bits*: one run's views at different bit-widths (a DQ run's uniform candidates through
  ``forced_bits``): each image right at any of them counts as right;
- *seeds*: runs of one recipe that differ only in their seed (their configs equal but for
  ``seed``, ``name`` and ``out``), each at the same bit-width: each image right in any of
  them counts as right, and no image is given a bit more.

For every set of views: each view's top-1, the share of images on which the views do not all
answer alike, and the oracle's top-1 above the best view. Each run's ``last.pt`` (the final
model, whose figures its ``summary.json`` holds); a DQ view's top-1 is checked against the
``headroom`` of its ``summary.json``.

    python benchmarks/seed_oracle.py runs/reproduce_cifar10/pact_static3{,_seed1} \\
        runs/reproduce_cifar10/pact_dq_budget3_candidate_bn+stats+distill_highest+bits345+budget070{,+seed1,+seed2}
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from instaquant.builder import load_for_eval
from instaquant.convert import DynamicQuantModel

RUN_ONLY_KEYS = ("seed", "name", "out")  # config keys that do not change the recipe


@torch.no_grad()
def outcomes(run: Path, progress: bool = False) -> tuple[dict, dict[int, Tensor]]:
    """The run's config, and ``{bits: [N] bool}``: which test images its final model
    classifies correctly, at each uniform candidate of a DQ run, or at a static run's
    bit-width."""
    cfg, model, extra = load_for_eval(run / "last.pt", [])
    if cfg.recipe not in ("static", "dynamic"):
        raise SystemExit(f"{run} is a {cfg.recipe!r} run: give static or dynamic (DQ) runs")
    model.eval()
    dynamic = isinstance(model, DynamicQuantModel)
    widths = list(model.spec.bits) if dynamic else list(cfg.quant.bits)
    right: dict[int, list[Tensor]] = {b: [] for b in widths}
    for x, y in tqdm(extra["test_loader"], desc=run.name, leave=False, disable=not progress):
        for b in widths:
            if dynamic:
                with model.forced_bits([b] * len(model.dynamic_layers)):
                    right[b].append((model(x).argmax(1) == y).cpu())
            else:
                right[b].append((model(x).argmax(1) == y).cpu())
    return extra["ckpt"]["config"], {b: torch.cat(r) for b, r in right.items()}


def oracle_row(label: str, kind: str, views: list[Tensor]) -> dict:
    """Each view's top-1, the share of images the views do not all answer alike, and the
    oracle's (right where any view is) top-1 above the best view's."""
    table = torch.stack(views, 1)  # [N, V]
    top1 = (100.0 * table.double().mean(0)).tolist()
    oracle = 100.0 * float(table.any(1).double().mean())
    differ = 100.0 * float((table.any(1) & ~table.all(1)).double().mean())
    return {
        "views": label,
        "kind": kind,
        "top1": top1,
        "differ": differ,
        "oracle_top1": oracle,
        "oracle_gain": oracle - max(top1),
    }


def recipe_key(config: dict) -> str:
    """A run's config without what only names or seeds it: equal keys, one recipe."""
    return json.dumps({k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}, sort_keys=True)


def rows(results: dict[Path, dict[int, Tensor]], configs: dict[Path, dict]) -> list[dict]:
    """Every bits set within one run (each pair and all together) and every seeds set at one
    bit-width within one recipe (each pair and all together)."""
    out = []
    for run, by_bits in results.items():
        widths = sorted(by_bits)
        for size in range(2, len(widths) + 1):
            for subset in combinations(widths, size):
                label = f"{run.name} at {'/'.join(map(str, subset))} bits"
                out.append(oracle_row(label, "bits", [by_bits[b] for b in subset]))
    groups: dict[str, list[Path]] = {}
    for run in results:
        groups.setdefault(recipe_key(configs[run]), []).append(run)
    for runs in groups.values():
        for b in sorted(set.intersection(*(set(results[r]) for r in runs))):
            for size in range(2, len(runs) + 1):
                for subset in combinations(runs, size):
                    names = " / ".join(r.name for r in subset)
                    views = [results[r][b] for r in subset]
                    out.append(oracle_row(f"{names} at {b} bits", "seeds", views))
    return out


def check_against_summary(run: Path, by_bits: dict[int, Tensor]) -> None:
    """A DQ view's top-1 must be the one its summary.json's headroom recorded."""
    room = json.loads((run / "summary.json").read_text())["runs"][0].get("headroom")
    if not room:
        return
    for b, recorded in zip(room["candidates"], room["uniform_top1"], strict=True):
        measured = 100.0 * float(by_bits[b].double().mean())
        if abs(measured - recorded) > 1e-6:
            raise SystemExit(f"{run.name} at {b} bits: {measured:.2f}% here, {recorded:.2f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders (last.pt, summary.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results, configs = {}, {}
    for run in args.runs:
        configs[run], results[run] = outcomes(run, args.progress)
        check_against_summary(run, results[run])
    table = rows(results, configs)
    print("| views | kind | each top-1 | answers differ | oracle | oracle − best |")
    print("|---|---|---|---:|---:|---:|")
    for r in table:
        each = " / ".join(f"{t:.2f}" for t in r["top1"])
        print(
            f"| {r['views']} | {r['kind']} | {each} | {r['differ']:.1f}% | "
            f"{r['oracle_top1']:.2f} | +{r['oracle_gain']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
