"""The embedded demo: full precision, static at each candidate, and DQ on the 8x8 digits."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import config as config_mod
from .engine import fit, write_summary
from .report import plot_accuracy_vs_bitops, report_headline, write_report

CANDIDATES = [2, 3, 4]
METHOD = "pact"


def _base(out: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "seed": 0,
        "out": str(out / name),
        "model": {"name": "digits_net"},
        "data": {"name": "digits", "batch_size": 64, "eval_batch_size": 512},
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
    """The demo's DQ run (configs/digits_demo.yaml holds the same settings)."""
    middle = CANDIDATES[len(CANDIDATES) // 2]
    return {
        **_base(out, "dq"),
        "recipe": "dynamic",
        "epochs": 12,
        "model": {"name": "digits_net", "init": str(out / "fp")},
        "quant": {"method": METHOD, "bits": CANDIDATES, "tau": 1.0, "tau_final": 0.2},
        "budget": {"kind": "bitops", "target_bits": middle, "weight": 2.0},
        "optim": {"lr": 0.02, "schedule": "cosine", "weight_decay": 1e-4},
    }


def format_table(runs: list[dict]) -> str:
    ref = next((r["reference_bits"] for r in runs if r.get("reference_bits")), None)
    w = max(10, *(len(r["name"]) for r in runs))
    head = f"{'run':<{w}} {'recipe':<8} {'bits':<7} {'top1 %':>7} {'mean bits':>9} {'BitOPs':>8}  spread"
    lines = [head, "-" * (len(head) + 30)]
    for r in runs:
        bits = "32" if r["bits"] is None else ",".join(map(str, r["bits"]))
        mb = f"{r['bits_mean']:.2f}" if r.get("bits_mean") is not None else "-"
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
            f"{r['name']:<{w}} {r['recipe']:<8} {bits:<7} {r['top1']:>7.2f} {mb:>9} {rel:>8}  {spread}"
        )
    lines.append(f"BitOPs relative to the static {ref}-bit model.")
    for r in runs:
        if r.get("controller_overhead") is not None:
            lines.append(
                f"{r['name']}: bit controller {r['controller_macs']:,} MACs "
                f"({100 * r['controller_overhead']:.2f}% of the backbone's MACs), "
                f"{r['controller_params']:,} params"
            )
    return "\n".join(lines)


def _candidate_shares(fraction: list) -> list[float]:
    """Average share of each candidate over layers (and weight/activation when separate)."""
    import torch

    t = torch.tensor(fraction, dtype=torch.float64)
    return t.reshape(-1, t.shape[-1]).mean(0).tolist()


def run_demo(out: str | Path = "runs/demo", progress: bool = True) -> dict[str, Any]:
    """Train every demo run into ``out``, write ``summary.json`` and the plot there, and the
    DQ run's report (``dq/report/``, difficulty from the demo's full-precision run)."""
    out = Path(out)
    t0 = time.time()
    entries = []
    for cfg in demo_configs(out):
        print(
            f"== {cfg.name}: {cfg.recipe}"
            + ("" if cfg.recipe == "fp" else f" {cfg.quant.method} bits {cfg.quant.bits}"),
            flush=True,
        )
        entries.append(fit(cfg, progress=progress, overwrite=True))
    summary_path = out / "summary.json"
    write_summary(summary_path, entries)
    plot = plot_accuracy_vs_bitops(
        entries, out / "accuracy_vs_bitops.png", "instaquant demo: 8x8 digits"
    )
    print()
    print(format_table(entries))
    report = write_report(out / "dq", fp_run=out / "fp")
    print(f"\nwall time {time.time() - t0:.0f} s; wrote {summary_path} and {plot}")
    print(f"DQ {report_headline(report)}")
    return json.loads(summary_path.read_text())
