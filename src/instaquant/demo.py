"""The embedded demo: full precision, static at each candidate, and DQ on the 8x8 digits at four
noise strengths (``digits_noise``: each digit clean and with three levels of Gaussian noise, so
how hard an image is is known by construction)."""

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
from .stats import spearman

CANDIDATES = [2, 3, 4]
METHOD = "pact"
DATASET = "digits_noise"
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
    """The demo's runs in order: fp, static at each candidate, then DQ at the middle budget."""
    middle = CANDIDATES[len(CANDIDATES) // 2]
    fp = {
        **_base(out, "fp"),
        "recipe": "fp",
        "epochs": 15,
        "optim": {"lr": 0.1, "schedule": "cosine"},
    }
    finetune = {"lr": 0.02, "schedule": "cosine", "weight_decay": 1e-4}
    runs = [fp]
    for b in CANDIDATES:
        runs.append(
            {
                **_base(out, f"static{b}"),
                "recipe": "static",
                "epochs": 8,
                "reference_bits": middle,
                "model": {"name": "digits_net", "init": str(out / "fp")},
                "quant": {"method": METHOD, "bits": [b]},
                "optim": finetune,
            }
        )
    runs.append(digits_dq_dict(out))
    return [config_mod.from_dict(r) for r in runs]


def digits_dq_dict(out: Path) -> dict[str, Any]:
    """The demo's DQ run (configs/digits_demo.yaml holds the same settings): the controller
    also sees per-channel statistics of the tap, and the highest candidate teaches the others,
    the two options that made bits follow the noise strength (docs/results.md)."""
    middle = CANDIDATES[len(CANDIDATES) // 2]
    return {
        **_base(out, "dq"),
        "recipe": "dynamic",
        "epochs": 12,
        "model": {"name": "digits_net", "init": str(out / "fp")},
        "quant": {
            "method": METHOD,
            "bits": CANDIDATES,
            "tau": 1.0,
            "tau_final": 0.2,
            "controller_stats": True,
        },
        "distill": {"teacher": "highest"},
        "budget": {"kind": "bitops", "target_bits": middle, "weight": 2.0},
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


def _reference_of(run: dict) -> tuple[int | None, float | None]:
    """A summary entry's reference: its bit-width and, when the entry allows, its BitOPs (a
    whole number for a static model; rounded so that the ratio's float error does not count)."""
    known = run.get("bitops_mean") and run.get("bitops_rel")
    return run.get("reference_bits"), (
        round(run["bitops_mean"] / run["bitops_rel"]) if known else None
    )


def format_table(runs: list[dict]) -> str:
    runs, reference = common_reference(runs)
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
    plot = plot_accuracy_vs_bitops(
        common_reference(entries)[0],
        out / "accuracy_vs_bitops.png",
        "instaquant demo: 8x8 digits at four noise strengths",
    )
    print()
    print(format_table(entries))
    report = write_report(out / "dq", fp_run=out / "fp", progress=progress)
    print(f"\nwall time {time.time() - t0:.0f} s; wrote {summary_path} and {plot}")
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
