"""How predictable is which images more bits fix? Linear probes on a DQ run's test set.

For a DQ run's ``last.pt``, each test image's outcome at every uniform candidate of the shared
weights (:func:`instaquant.headroom.measure_headroom`), and the question a controller must
answer: does the dearest candidate get this image right where the cheapest gets it wrong
("needs bits"), and more narrowly, where the middle one does ("needs the dearest")? And
among the images whose answer changes between the cheapest and the dearest candidate, do more
bits fix it or break it ("fixed, not broken")? A logistic-regression probe answers each from
each of four views of the image:

- the tap as the run's controller sees it (its own input features);
- the tap pooled to a 4x4 grid with per-channel statistics (a richer controller input);
- the cheapest candidate's output (its sorted softmax and entropy: what a cascade sees, after
  paying for that pass);
- the full-precision network's penultimate features and sorted softmax (a view no
  controller gets: the whole network at full precision).

Two folds of the test set: each probe is fit on one half and scored on the other, and the
area under the ROC curve (AUC; 0.5 is chance, 1 a perfect ranking) is averaged over the folds.
Then each probe's out-of-fold score ranks the images for a ranked allocation at the
controller's BitOPs (:meth:`~instaquant.headroom.Headroom.best_ranked`): what a controller as
good as that probe could buy with these weights, against the controller itself.

    python benchmarks/predictability.py runs/reproduce_cifar10/pact_dq_budget3_* --out probes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from instaquant.builder import init_model, load_for_eval
from instaquant.controller import BitController
from instaquant.data import build_loaders
from instaquant.headroom import measure_headroom
from instaquant.stats import rankdata


def auc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return (float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def logistic_fit(x: Tensor, y: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """Weights and bias of an L2-regularized logistic regression (LBFGS) of ``y`` on ``x``."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    target = y.double()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, target) + decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_scores(x: Tensor, y: Tensor, folds: int = 2, decay: float = 1e-3) -> Tensor:
    """Out-of-fold logits of a logistic-regression probe of ``y`` on standardized ``x``."""
    fold = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)) % folds
    out = torch.empty(len(y), dtype=torch.float64)
    for f in range(folds):
        fit, held = fold != f, fold == f
        mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-8)
        w, b = logistic_fit((x[fit] - mean) / std, y[fit], decay)
        out[held] = (x[held] - mean) / std @ w + b
    return out


def _sorted_softmax(logits: Tensor) -> Tensor:
    p = logits.double().softmax(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1, keepdim=True)
    return torch.cat([p.sort(1, descending=True).values, entropy], 1)


@torch.no_grad()
def views(model, fp, loader) -> dict[str, Tensor]:
    """The four views of every test image (see the module doc)."""
    taps: list[Tensor] = []
    fp_features: list[Tensor] = []
    tap_module = model.model.get_submodule(model.spec.tap)
    hook = tap_module.register_forward_hook(lambda m, i, o: taps.append(o))
    fc_hook = fp.fc.register_forward_hook(lambda m, i, o: fp_features.append(i[0]))
    channels = model.tap_shape[0]
    rich = BitController(channels, num_layers=1, num_candidates=2, grid=4, stats=True)
    out: dict[str, list[Tensor]] = {k: [] for k in ("tap", "tap_grid", "cheap", "fp")}
    L, cheapest = len(model.dynamic_layers), model.spec.bits[0]
    model.eval()
    fp.eval()
    try:
        for x, _ in loader:
            with model.forced_bits([cheapest] * L):
                cheap = model(x)
            tap = taps.pop()
            out["tap"].append(model.controller.features(tap).double())
            out["tap_grid"].append(rich.features(tap).double())
            out["cheap"].append(_sorted_softmax(cheap))
            logits = fp(x)
            out["fp"].append(torch.cat([fp_features.pop().double(), _sorted_softmax(logits)], 1))
            taps.clear()
    finally:
        hook.remove()
        fc_hook.remove()
    return {k: torch.cat(v).cpu() for k, v in out.items()}


VIEWS = {
    "tap": "the controller's input",
    "tap_grid": "tap on a 4x4 grid + statistics",
    "cheap": "the cheapest candidate's output",
    "fp": "the full-precision network",
}


def measure(run: Path) -> dict:
    cfg, model, _ = load_for_eval(run / "last.pt", [])
    _, test_loader, info = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    fp = init_model(cfg, info, torch.device("cpu"))
    room = measure_headroom(model, test_loader, cfg.ref_bits)
    seen = views(model, fp, test_loader)
    right = room.right
    targets = {
        "needs bits": right[:, -1] & ~right[:, 0],
        "needs the dearest": right[:, -1] & ~right[:, len(room.candidates) // 2],
    }
    # Among the images whose answer changes between the cheapest and the dearest candidate:
    # does more bits fix it or break it? Bits spent on a boundary image are a coin toss
    # unless a view tells the two apart.
    changed = right[:, -1] != right[:, 0]
    bitops = float(room.controller_bitops.mean())
    result = {
        "run": run.name,
        "controller": [room.summary()["controller_top1"], bitops / room.ref_bitops],
        "base_rate": {t: float(y.double().mean()) for t, y in targets.items()},
        "changed": float(changed.double().mean()),
        "fixed_among_changed": float(right[changed, -1].double().mean()),
        "auc": {},
        "ranked_top1": {},
    }
    for name, x in seen.items():
        result["auc"][name] = {t: auc(probe_scores(x, y), y) for t, y in targets.items()}
        fixed = right[changed, -1]
        result["auc"][name]["fixed, not broken"] = auc(probe_scores(x[changed], fixed), fixed)
        score = probe_scores(x, targets["needs bits"])
        result["ranked_top1"][name] = room.best_ranked(score, bitops)[0]
    start = room.monotone_start()
    oracle = torch.where(start == len(room.candidates), -1, start)
    result["ranked_top1"]["monotone oracle"] = room.best_ranked(oracle, bitops)[0]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="DQ run folders (last.pt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        r = measure(run)
        rows.append(r)
        c, cb = r["controller"]
        print(
            f"\n{r['run']}: controller {c:.2f}% at {cb:.3f}x; base rates "
            + ", ".join(f"{t} {100 * v:.1f}%" for t, v in r["base_rate"].items())
            + f"; answer changes cheapest to dearest {100 * r['changed']:.1f}%, of those "
            f"fixed {100 * r['fixed_among_changed']:.0f}%"
        )
        print(
            "| view | AUC: needs bits | needs the dearest | fixed, not broken "
            "| ranked by the probe at the controller's BitOPs |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, label in VIEWS.items():
            a = r["auc"][name]
            print(
                f"| {label} | {a['needs bits']:.3f} | {a['needs the dearest']:.3f} | "
                f"{a['fixed, not broken']:.3f} | {r['ranked_top1'][name]:.2f} |"
            )
        oracle = r["ranked_top1"]["monotone oracle"]
        print(f"| the monotone oracle's order | | | | {oracle:.2f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
