"""Plots and run reports."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(run: dict) -> str:
    if run["recipe"] == "fp":
        return "full precision"
    bits = "/".join(map(str, run["bits"]))
    return f"{run['method']} {'DQ' if run['recipe'] == 'dynamic' else 'static'} {bits}-bit"


def plot_accuracy_vs_bitops(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """Top-1 against mean BitOPs (relative to the reference static model) for quantized runs.

    Static runs are drawn as squares joined per method, dynamic runs as stars;
    full precision as a horizontal line.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        if run["recipe"] == "fp":
            ax.axhline(run["top1"], color="grey", ls="--", lw=1, label="full precision")
        elif run["recipe"] == "static":
            by_method.setdefault(run["method"], []).append(run)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    method_color = {
        m: colors[i % len(colors)]
        for i, m in enumerate(sorted({r["method"] for r in runs if r["method"]}))
    }
    for method, group in by_method.items():
        group = sorted(group, key=lambda r: r["bitops_rel"])
        xs, ys = [r["bitops_rel"] for r in group], [r["top1"] for r in group]
        ax.plot(xs, ys, "s-", color=method_color[method], label=f"{method} static")
        for r in group:
            ax.annotate(
                f"{r['bits'][0]}-bit",
                (r["bitops_rel"], r["top1"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
            )
    for run in runs:
        if run["recipe"] == "dynamic":
            ax.plot(
                run["bitops_rel"],
                run["top1"],
                "*",
                ms=14,
                color=method_color[run["method"]],
                markeredgecolor="black",
                label=_label(run),
            )
    ref = next((r.get("reference_bits") for r in runs if r.get("reference_bits")), None)
    ax.set_xlabel(f"mean BitOPs relative to static {ref}-bit" if ref else "mean BitOPs (relative)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
