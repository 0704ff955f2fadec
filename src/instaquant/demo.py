"""The embedded demo: full precision, static at each candidate, and DQ on two kinds of 8x8
image (``digits_mixed``): half are two parallel bars whose direction and spacing name the class,
which 1-bit activations read, half are digits under a brighter digit of another class, which
gain from every activation bit. What each image needs is known by construction. Weights stay
at 4 bits and activations choose among 1, 2 and 3, so a bit costs the same for both kinds, and
DQ's budget, 1.5 activation bits, is what the bars at 1 bit and the covered digits at 2 spend."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from .data import LEVELED_DATASETS, level_of_test_images
from .engine import fit, write_summary
from .report import (
    fixed_weights_label,
    plot_accuracy_vs_bitops,
    report_headline,
    write_report,
)
from .stats import line_at, spearman

CANDIDATES = [1, 2, 3]  # activation bits
WEIGHT_BITS = 4
BUDGET_BITS = 1.5  # halfway between static W4A1 and W4A2
METHOD = "pact"
DATASET = "digits_mixed"
QAT_EPOCHS = 10
# What a level of each leveled dataset is, and how a level is written (a format or a name).
LEVEL_NAMES: dict[str, tuple[str, str | dict[float, str]]] = {
    "digits_noise": ("noise strength", "σ={:g}"),
    "digits_contrast": ("contrast", "{:g}"),
    "digits_blend": ("weight of the labelled digit", "w={:g}"),
    "digits_overlay": ("brightness of the cover", "k={:g}"),
    "digits_mixed": ("kind", {0.0: "bars", 1.0: "covered digits"}),
}


def _base(out: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "seed": 0,
        "out": str(out / name),
        "model": {"name": "digits_net"},
        "data": {"name": DATASET, "batch_size": 64, "eval_batch_size": 512},
    }


def demo_configs(out: Path) -> list[config_mod.Config]:
    """The demo's runs in order: fp, static at each candidate, then DQ."""
    middle = CANDIDATES[len(CANDIDATES) // 2]
    fp = {
        **_base(out, "fp"),
        "recipe": "fp",
        "epochs": 20,
        "optim": {"lr": 0.1, "schedule": "cosine"},
    }
    finetune = {"lr": 0.02, "schedule": "cosine", "weight_decay": 1e-4}
    runs = [fp]
    for b in CANDIDATES:
        runs.append(
            {
                **_base(out, f"static{b}"),
                "recipe": "static",
                "epochs": QAT_EPOCHS,
                "reference_bits": middle,
                "model": {"name": "digits_net", "init": str(out / "fp")},
                "quant": {"method": METHOD, "bits": [b], "weight_bits": WEIGHT_BITS},
                "optim": finetune,
            }
        )
    runs.append(digits_dq_dict(out))
    return [config_mod.from_dict(r) for r in runs]


def digits_dq_dict(out: Path) -> dict[str, Any]:
    """The demo's DQ run (configs/digits_demo.yaml holds the same settings): the controller
    also sees per-channel statistics of the tap, and the highest candidate teaches the others,
    the two options that made bits follow the known kind of image (docs/results.md)."""
    middle = CANDIDATES[len(CANDIDATES) // 2]
    return {
        **_base(out, "dq"),
        "recipe": "dynamic",
        "epochs": QAT_EPOCHS,
        "reference_bits": middle,
        "model": {"name": "digits_net", "init": str(out / "fp")},
        "quant": {
            "method": METHOD,
            "bits": CANDIDATES,
            "weight_bits": WEIGHT_BITS,
            "tau": 1.0,
            "tau_final": 0.2,
            "controller_stats": True,
        },
        "distill": {"teacher": "highest"},
        "budget": {"kind": "bitops", "target_bits": BUDGET_BITS, "weight": 2.0},
        "optim": {"lr": 0.02, "schedule": "cosine", "weight_decay": 1e-4},
    }


def common_reference(runs: list[dict]) -> tuple[list[dict], str]:
    """Copies of ``runs`` whose ``bitops_rel`` all count against one reference, and a line
    naming it.

    Each run's ``bitops_rel`` is relative to its own static model at its own
    ``reference_bits``, so runs of different references cannot share a column or an axis
    as written. The first quantized run's reference BitOPs (``bitops_mean / bitops_rel``)
    becomes every run's; a run without absolute BitOPs keeps its ratio only when its
    reference bit-width is the same.
    """
    base = next((r for r in runs if r["recipe"] != "fp" and r.get("bitops_rel")), None)
    if base is None:
        return runs, "No quantized runs: BitOPs apply to quantized models only."
    ref_bits, ref_bitops = _reference_of(base)
    out, dropped = [], []
    for r in runs:
        r = dict(r)
        if r["recipe"] != "fp" and r.get("bitops_rel") is not None:
            if ref_bitops and r.get("bitops_mean") is not None:
                r["bitops_rel"] = r["bitops_mean"] / ref_bitops
            elif r.get("reference_bits") != ref_bits:
                r["bitops_rel"] = None
                dropped.append(r["name"])
            r["reference_bits"] = ref_bits
        out.append(r)
    # One reference for all only if every quantized run had the same bits and the same model.
    shared = len({_reference_of(r) for r in runs if r["recipe"] != "fp"}) == 1
    line = f"BitOPs relative to the static {ref_bits}-bit model"
    if shared:
        line += "."
    else:
        line += " of the first quantized run"
        line += f" ({base['name']!r}, {ref_bitops:.4g} BitOPs per image)." if ref_bitops else "."
    if dropped:
        line += (
            f" Not shown for {', '.join(map(repr, dropped))}: another reference bit-width"
            " and no absolute BitOPs in the summary to convert."
        )
    return out, line


def relative_to_run(runs: list[dict], name: str) -> tuple[list[dict], str]:
    """Copies of ``runs`` whose ``bitops_rel`` count against the run ``name``'s own mean
    BitOPs, and a line naming it: the demo's reference is static W4A2 itself, where the
    library's ``reference_bits`` always means weights and activations at the same bits."""
    base = next((r for r in runs if r["name"] == name), None)
    if base is None or not base.get("bitops_mean"):
        raise ValueError(f"no quantized run named {name!r} with BitOPs among the runs")
    label = _run_label(base)
    out = []
    for r in runs:
        r = dict(r)
        if r["recipe"] != "fp":
            mean = r.get("bitops_mean")
            r["bitops_rel"] = None if mean is None else mean / base["bitops_mean"]
            r["reference_name"] = label
        out.append(r)
    return out, f"BitOPs relative to {label}."


def _run_label(run: dict) -> str:
    """``static W4A2`` for a static run with fixed weights, ``static 3-bit`` without."""
    if run["recipe"] != "static":
        return repr(run["name"])
    return "static " + (fixed_weights_label(run) or f"{run['bits'][0]}-bit")


def static_line_margin(runs: list[dict], dq_name: str = "dq") -> str:
    """How far the DQ run lands from static quantization at its own mean BitOPs: the line
    joining the static runs (a share of images at each of two static models spends any BitOPs
    between them)."""
    static = sorted((r["bitops_mean"], r["top1"]) for r in runs if r["recipe"] == "static")
    dq = next((r for r in runs if r["name"] == dq_name), None)
    if dq is None or len(static) < 2 or not static[0][0] <= dq["bitops_mean"] <= static[-1][0]:
        return "(no static models on both sides of the DQ run's BitOPs to compare with)"
    at = line_at(static, dq["bitops_mean"])
    return (
        f"DQ {dq['top1']:.2f}% against static at equal BitOPs ({at:.2f}% on the line joining "
        f"the static models): {dq['top1'] - at:+.2f} points"
    )


def _reference_of(run: dict) -> tuple[int | None, float | None]:
    """A summary entry's reference: its bit-width and, when the entry allows, its BitOPs (a
    whole number for a static model; rounded so that the ratio's float error does not count)."""
    known = run.get("bitops_mean") and run.get("bitops_rel")
    return run.get("reference_bits"), (
        round(run["bitops_mean"] / run["bitops_rel"]) if known else None
    )


def format_table(runs: list[dict], relative_to: str | None = None) -> str:
    """The runs as a text table; BitOPs against one reference (:func:`common_reference`), or
    against the run named ``relative_to`` (:func:`relative_to_run`)."""
    runs, reference = (
        common_reference(runs) if relative_to is None else relative_to_run(runs, relative_to)
    )
    w = max(10, *(len(r["name"]) for r in runs))
    head = f"{'run':<{w}} {'recipe':<8} {'bits':<10} {'top1 %':>7} {'mean bits':>9} {'BitOPs':>8}  spread"
    lines = [head, "-" * (len(head) + 30)]
    for r in runs:
        bits, mb = _bits_columns(r)
        rel = f"{r['bitops_rel']:.3f}x" if r.get("bitops_rel") is not None else "-"
        spread = ""
        if r.get("candidate_fraction"):
            frac = _candidate_shares(r["candidate_fraction"])
            shares = " / ".join(
                f"{b}b {100 * f:.0f}%" for b, f in zip(r["bits"], frac, strict=True)
            )
            lo, hi = r["bitops_min"] / r["bitops_mean"], r["bitops_max"] / r["bitops_mean"]
            spread = f"{shares}; per-image BitOPs {lo:.2f}-{hi:.2f}x of mean"
        lines.append(
            f"{r['name']:<{w}} {r['recipe']:<8} {bits:<10} {r['top1']:>7.2f} {mb:>9} {rel:>8}  {spread}"
        )
    lines.append(reference)
    for r in runs:
        if r.get("controller_overhead") is not None:
            lines.append(
                f"{r['name']}: bit controller {r['controller_macs']:,} MACs "
                f"({100 * r['controller_overhead']:.2f}% of the backbone's MACs), "
                f"{r['controller_params']:,} params"
            )
    return "\n".join(lines)


def _bits_columns(run: dict) -> tuple[str, str]:
    """A run's bit-widths and mean bits as the table writes them; with the weights fixed
    (``weight_bits``) the bits are the activations', and so is the mean (``W4A1,2,3``)."""
    if run["bits"] is None:
        return "32", "-"
    mean = run.get("bits_mean")
    fixed = fixed_weights_label(run)
    if fixed is None:
        return ",".join(map(str, run["bits"])), "-" if mean is None else f"{mean:.2f}"
    # bits_mean averages weight and activation bits; the weights' are known.
    return fixed, "-" if mean is None else f"A {2 * mean - run['weight_bits']:.2f}"


def _candidate_shares(fraction: list) -> list[float]:
    """Average share of each candidate over layers (and weight/activation when separate)."""
    import torch

    t = torch.tensor(fraction, dtype=torch.float64)
    return t.reshape(-1, t.shape[-1]).mean(0).tolist()


def run_demo(
    out: str | Path = "runs/demo", progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Train every demo run into ``out``, write ``summary.json`` and the plot there, and the
    DQ run's report (``dq/report/``, difficulty from the demo's full-precision run).

    Without ``resume`` every run starts afresh; with it, finished runs are kept and an
    interrupted one continues from its ``last.pt``."""
    out = Path(out)
    t0 = time.time()
    entries = []
    for cfg in demo_configs(out):
        print(
            f"== {cfg.name}: {cfg.recipe}"
            + ("" if cfg.recipe == "fp" else f" {cfg.quant.method} bits {cfg.quant.bits}"),
            flush=True,
        )
        entries.append(fit(cfg, resume=resume, progress=progress, overwrite=not resume))
    summary_path = out / "summary.json"
    write_summary(summary_path, entries)
    # BitOPs against the static model at the middle candidate (W4A2), when the demo trained it.
    middle = f"static{CANDIDATES[len(CANDIDATES) // 2]}"
    reference = middle if any(e["name"] == middle for e in entries) else None
    on_one_scale = (
        common_reference(entries) if reference is None else relative_to_run(entries, reference)
    )
    plot = plot_accuracy_vs_bitops(
        on_one_scale[0],
        out / "accuracy_vs_bitops.png",
        "instaquant demo: bars and covered digits, W4 A1/2/3",
    )
    print()
    print(format_table(entries, relative_to=reference))
    report = write_report(out / "dq", fp_run=out / "fp", progress=progress)
    print(f"\nwall time {time.time() - t0:.0f} s; wrote {summary_path} and {plot}")
    print(static_line_margin(entries))
    print(f"DQ {report_headline(report)}")
    print(level_line(report["csv"], DATASET))
    return json.loads(summary_path.read_text())


def level_line(per_sample_csv: Path, dataset: str) -> str:
    """How the DQ run's per-image BitOPs follow the known level (noise strength, contrast, ...) of
    each test image of a leveled dataset (:data:`instaquant.data.LEVELED_DATASETS`)."""
    with open(per_sample_csv, newline="") as f:
        bitops = torch.tensor([float(r["bitops"]) for r in csv.DictReader(f)], dtype=torch.float64)
    levels = LEVELED_DATASETS[dataset]
    what, written = LEVEL_NAMES[dataset]
    if bitops.numel() % len(levels):
        return f"(a subset of the test set: no {what} per image to compare with)"
    known = level_of_test_images(dataset, bitops.numel())
    means = [float(bitops[known == v].mean() / bitops.mean()) for v in levels]
    named = written.get if isinstance(written, dict) else written.format
    per_level = ", ".join(f"{named(v)}: {m:.3f}x" for v, m in zip(levels, means, strict=True))
    return (
        f"DQ per-image BitOPs against the known {what}: Spearman ρ = "
        f"{spearman(bitops, known):+.3f}; mean BitOPs per {what} (x the mean): {per_level}"
    )
