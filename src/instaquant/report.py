"""Plots and the run report (``report/`` in a run folder: CSV, PNGs, report.md, report.html)."""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .analysis import (  # noqa: E402
    Analysis,
    accuracy_by_quantile,
    analyze,
    boundary_tie,
    candidate_usage,
    correlations,
    data_identity,
    display_images,
    extremes,
    rankdata,
    tie_break_rule,
    write_csv,
)
from .config import UserError  # noqa: E402
from .config import load as load_config  # noqa: E402

BITOPS_NOTE = "BitOPs: quantized layers only; full-precision layers are not counted"


def _label(run: dict) -> str:
    if run["recipe"] == "fp":
        return "full precision"
    bits = _bits_label(run["bits"], run.get("weight_bits"))
    return f"{run['method']} {'DQ' if run['recipe'] == 'dynamic' else 'static'} {bits}"


def _bits_label(bits: list[int] | tuple[int, ...], weight_bits: int | None) -> str:
    """``3/4/5-bit``, or ``W4 A2/3/4`` when the weights are fixed and only activations choose."""
    joined = "/".join(map(str, bits))
    return f"{joined}-bit" if weight_bits is None else f"W{weight_bits} A{joined}"


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _footnote(fig: Any, text: str = BITOPS_NOTE) -> None:
    fig.text(0.99, 0.005, text, ha="right", va="bottom", fontsize=7, color="dimgrey")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def fixed_weights_label(run: dict) -> str | None:
    """A run's bits when its weights are fixed (``weight_bits``), as tables and plots write
    them: ``W4A2``, ``W4A1,2,3``; None when weights and activations share the bits."""
    weight_bits = run.get("weight_bits")
    if weight_bits is None or run.get("bits") is None:
        return None
    return f"W{weight_bits}A" + ",".join(map(str, run["bits"]))


def plot_accuracy_vs_bitops(
    runs: list[dict], path: str | Path, title: str = "", highlight: str | None = None
) -> Path:
    """Top-1 against mean BitOPs (relative to the reference static model) for quantized runs.

    Static runs are drawn as squares joined per method, dynamic runs as stars, full
    precision as a horizontal line; a dotted step line marks the Pareto front of all
    quantized points. ``highlight`` circles the run of that name.
    """
    dynamic = [r for r in runs if r["recipe"] == "dynamic"]
    # Past a few DQ runs the legend would hide points: it goes below the axes instead.
    below = len(dynamic) > 4
    height = 4.6 + (0.2 * (len(dynamic) + 3) if below else 0)
    fig, ax = plt.subplots(figsize=(6.4, height), dpi=120)
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        if run["recipe"] != "fp" and run.get("bitops_rel") is None:
            continue  # no BitOPs on this plot's scale (see demo.common_reference)
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
                fixed_weights_label(r) or f"{r['bits'][0]}-bit",
                (r["bitops_rel"], r["top1"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
            )
    for i, run in enumerate(dynamic):
        name = f" ({run['name']})" if len(dynamic) > 1 else ""
        marker = "*PXDv^p<>hH8d"[i % 13]  # several DQ runs of one method share a colour
        ax.plot(
            run["bitops_rel"],
            run["top1"],
            marker,
            ms=14 if marker == "*" else 10,
            color=method_color[run["method"]],
            markeredgecolor="black",
            label=_label(run) + name,
        )
    quantized = [r for r in runs if r["recipe"] != "fp" and r.get("bitops_rel") is not None]
    front = pareto_front([(r["bitops_rel"], r["top1"]) for r in quantized])
    if len(front) > 1:
        fx, fy = zip(*front, strict=True)
        ax.step(fx, fy, where="post", color="black", ls=":", lw=1.2, label="Pareto front")
    for r in quantized:
        if highlight is not None and r.get("name") == highlight:
            ax.plot(r["bitops_rel"], r["top1"], "o", ms=22, mfc="none", mec="red", mew=1.5)
            ax.annotate(
                "this run",
                (r["bitops_rel"], r["top1"]),
                textcoords="offset points",
                xytext=(0, 14),
                ha="center",
                fontsize=8,
                color="red",
            )
    # A named reference (demo.relative_to_run: a run itself) or a static bit-width.
    named = next((r["reference_name"] for r in runs if r.get("reference_name")), None)
    ref = next((r.get("reference_bits") for r in runs if r.get("reference_bits")), None)
    ref = named or (f"static {ref}-bit" if ref else None)
    ax.set_xlabel(f"mean BitOPs relative to {ref}" if ref else "mean BitOPs (relative)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs compute")
    ax.margins(x=0.08)  # room for the bit-width labels beside the end points
    ax.grid(alpha=0.3)
    if below:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    else:
        ax.legend(fontsize=8, loc="best")
    _footnote(fig)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_candidate_usage(a: Analysis, path: str | Path) -> Path:
    """Stacked bars: per dynamic layer, the share of test images that chose each candidate."""
    usage = 100 * candidate_usage(a)  # [L, K] or [L, 2, K]
    parts = (
        [("weights", usage[:, 0]), ("activations", usage[:, 1])] if a.separate else [("", usage)]
    )
    L, K = len(a.layer_names), len(a.candidates)
    width = min(max(6.4, 0.55 * L + 2.5), 16)
    fig, axes = plt.subplots(len(parts), 1, figsize=(width, 3.6 * len(parts) + 0.8), dpi=120)
    axes = [axes] if len(parts) == 1 else list(axes)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(0.15 + 0.7 * i / max(K - 1, 1)) for i in range(K)]
    x = torch.arange(L).tolist()
    for ax, (what, shares) in zip(axes, parts, strict=True):
        bottom = torch.zeros(L, dtype=torch.float64)
        for k, bits in enumerate(a.candidates):
            ax.bar(x, shares[:, k].tolist(), 0.75, bottom=bottom.tolist(), color=colors[k],
                   label=f"{bits}-bit", edgecolor="white", linewidth=0.5)  # fmt: skip
            for i in range(L):
                v = float(shares[i, k])
                if v >= 8:  # label segments tall enough to hold the text
                    mid = float(bottom[i]) + v / 2
                    color = "white" if k < K / 2 else "black"
                    ax.text(i, mid, f"{v:.0f}", ha="center", va="center", fontsize=7, color=color)
            bottom += shares[:, k]
        ax.set_xticks(x, [_short(n) for n in a.layer_names], rotation=45 if L > 4 else 0,
                      ha="right" if L > 4 else "center", fontsize=8)  # fmt: skip
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of test images (%)")
        ax.set_xlabel("dynamic layer (execution order)")
        ax.set_title(
            f"Bit-width chosen per layer{' for ' + what if what else ''} ({a.n} test images)",
            fontsize=10,
        )
        ax.legend(title="candidate", fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1))  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def plot_bitops_histogram(a: Analysis, path: str | Path) -> Path:
    """Per-sample BitOPs (relative to the static reference), stacked by correct / wrong."""
    rel = a.bitops_rel
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lo, hi = float(rel.min()), float(rel.max())
    values = torch.unique(rel)
    if len(values) <= 40:  # few distinct costs: one bar per value reads better than bins
        span = hi - lo if hi > lo else max(hi, 1e-9)
        step = float((values[1:] - values[:-1]).min()) if len(values) > 1 else span
        half = min(step * 0.4, span * 0.035) if len(values) > 1 else 0.02 * span
        edges = sorted({v for c in values.tolist() for v in (c - half, c + half)})
    else:
        edges = torch.linspace(lo, hi, 31).tolist()
    ok = a.correct
    ax.hist([rel[ok].tolist(), rel[~ok].tolist()], bins=edges, stacked=True,
            color=["tab:blue", "tab:red"], label=["correct", "wrong"])  # fmt: skip
    mean = float(rel.mean())
    ax.axvline(mean, color="black", lw=1.2, label=f"mean {mean:.3f}x")
    same = a.budget_rel is not None and abs(a.budget_rel - 1.0) < 1e-9
    ref_label = f"{a.reference_name} (1x)" + (" = budget target" if same else "")
    ax.axvline(1.0, color="grey", ls="--", lw=1, label=ref_label)
    if a.budget_rel is not None and not same:
        ax.axvline(a.budget_rel, color="tab:green", ls=":", lw=1.5,
                   label=f"budget target {a.budget_rel:.3f}x")  # fmt: skip
    ax.set_xlabel(f"BitOPs per image relative to {a.reference_name}")
    ax.set_ylabel("test images")
    ax.set_title(f"Per-image BitOPs of {a.name} ({a.n} test images)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _footnote(fig)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


def plot_bitops_vs_difficulty(a: Analysis, path: str | Path, rho: float) -> Path:
    """Each image's BitOPs against its difficulty percentile, with the mean per decile."""
    diff = a.difficulty.double()
    pct = 100 * (rankdata(diff) - 0.5) / a.n
    rel = a.bitops_rel
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ok = a.correct
    ax.scatter(pct[ok].tolist(), rel[ok].tolist(), s=10, alpha=0.35, color="tab:blue",
               label="correct", linewidths=0)  # fmt: skip
    ax.scatter(pct[~ok].tolist(), rel[~ok].tolist(), s=16, alpha=0.8, color="tab:red",
               marker="x", label="wrong", linewidths=1)  # fmt: skip
    bins = (pct / 10).floor().clamp(0, 9).long()
    centers, means = [], []
    for b in range(10):
        m = bins == b
        if bool(m.any()):
            centers.append(10 * b + 5)
            means.append(float(rel[m].mean()))
    ax.plot(centers, means, "o-", color="black", lw=1.5, ms=4, label="mean per decile")
    ax.set_xlabel(f"difficulty percentile ({a.difficulty_name}; 100 = hardest)")
    ax.set_ylabel(f"BitOPs relative to {a.reference_name}")
    rho_text = "undefined" if math.isnan(rho) else f"{rho:+.3f}"
    ax.set_title(f"BitOPs vs difficulty: Spearman ρ = {rho_text}")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _footnote(fig)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


def plot_gallery(a: Analysis, path: str | Path, k: int = 8) -> tuple[Path, Tensor, Tensor] | None:
    """The ``k`` cheapest and ``k`` most expensive test images with label, prediction, BitOPs
    (equal BitOPs ordered as :func:`~instaquant.analysis.tie_break_rule` says).

    Returns the path and both index lists, or None when every image costs the same (no
    cheapest or most expensive) or the images cannot be read back.
    """
    if a.bitops_constant:
        return None
    cheap, costly = extremes(a, k)
    k = len(cheap)
    if k == 0:
        return None
    imgs_cheap, imgs_costly = display_images(a, cheap), display_images(a, costly)
    if imgs_cheap is None or imgs_costly is None:
        return None
    fig = plt.figure(figsize=(max(1.25 * k, 6.4), 4.4), dpi=120)
    subs = fig.subfigures(2, 1)
    cheap_title = f"{k} cheapest test images (lowest BitOPs first; equal BitOPs: easiest first)"
    costly_title = f"{k} most expensive test images (highest BitOPs first; equal: hardest first)"
    for sub, idx, imgs, what in (
        (subs[0], cheap, imgs_cheap, cheap_title),
        (subs[1], costly, imgs_costly, costly_title),
    ):
        sub.suptitle(what, fontsize=10)
        axes = sub.subplots(1, k, squeeze=False)[0]
        sub.subplots_adjust(left=0.02, right=0.98, top=0.68, bottom=0.06, wspace=0.25)
        for ax, i, img in zip(axes, idx.tolist(), imgs, strict=True):
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
            label, pred = a.classes[int(a.label[i])], a.classes[int(a.pred[i])]
            wrong = int(a.label[i]) != int(a.pred[i])
            ax.set_title(
                f"#{i}  true {label}\npred {pred}{'  ✗' if wrong else ''}\n"
                f"{float(a.bitops_rel[i]):.3f}x",
                fontsize=7,
                color="red" if wrong else "black",
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.text(
        0.01,
        0.005,
        f"BitOPs relative to {a.reference_name}; red = wrong prediction",
        fontsize=7,
        color="dimgrey",
    )
    _footnote(fig)
    return _save(fig, path), cheap, costly


# --------------------------------------------------------------------------- report document


@dataclass
class _Doc:
    """A report as a list of blocks, rendered both to Markdown and to self-contained HTML."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, [[str(c) for c in r] for r in rows])))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "h2":
                out += [f"## {body}", ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "table":
                header, rows = body
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                path, caption = body
                out += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em;"
            "color:#222}table{border-collapse:collapse;margin:0.5em 0 1em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
            "figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:90%}"
            "</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, body in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(body)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(body)}</p>")
            elif kind == "table":
                header, rows = body
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
                out.append("</table>")
            elif kind == "img":
                path, caption = body
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _fmt_rho(rho: float) -> str:
    return "undefined" if math.isnan(rho) else f"{rho:+.3f}"


def _own_entry(a: Analysis) -> dict:
    """This run as a summary entry, from the analysis: there even without a summary.json
    (a time-sliced run), and at the analysed checkpoint (which may be best.pt)."""
    return {
        "name": a.name,
        "recipe": a.recipe,
        "model": a.model_name,
        "dataset": a.dataset,
        "method": a.method,
        "bits": list(a.candidates),
        "weight_bits": a.weight_bits,
        "top1": a.metrics["top1"],
        "bitops_mean": a.metrics["bitops_mean"],
    }


def related_runs(run_dir: Path, a: Analysis) -> list[dict]:
    """This run (the analysed numbers), the FP run analysed with it (its top-1 on the same
    images) and the finished runs beside it on the same model and data (their final
    checkpoint, as their summary.json records it), all relative to this run's reference.

    Without an FP run, FP runs beside this one are drawn from their summary.json too.
    """
    entries = [_own_entry(a)]
    fp_top1 = a.fp_top1
    if fp_top1 is not None:
        entries.append(
            {"name": "fp", "recipe": "fp", "method": None, "bits": None, "top1": fp_top1}
        )
    run_dir = run_dir.resolve()
    seen = {run_dir}
    # The data as analysed (after overrides such as a moved data.root) and as the run was
    # trained on, which is what the neighbours' own configs can be compared with.
    ours = {(a.dataset, a.data_root)}
    try:
        ours.add(data_identity(load_config(run_dir / "config.yaml")))
    except (OSError, ValueError, UserError):
        pass
    for d in sorted(p.resolve() for p in run_dir.parent.iterdir() if p.is_dir()):
        if d in seen or not (d / "summary.json").is_file():
            continue
        seen.add(d)
        try:
            runs = json.loads((d / "summary.json").read_text())["runs"]
            # summary.json names only the dataset; an image folder is told apart by its root.
            same_data = data_identity(load_config(d / "config.yaml")) in ours
        except (ValueError, KeyError, TypeError, UserError):
            continue  # a half-written or foreign run: leave it out of the plot
        if not same_data:
            continue
        for r in runs:
            if r.get("model") != a.model_name or r.get("dataset") != a.dataset:
                continue
            if r.get("recipe") == "fp" and fp_top1 is not None:
                continue  # one FP line: the analysed FP model's, on the same images
            entries.append(dict(r))
    for r in entries:
        if r.get("bitops_mean") is not None:
            r["bitops_rel"] = r["bitops_mean"] / a.ref_bitops
        r["reference_bits"] = a.ref_bits if r["recipe"] != "fp" else None
        if r["recipe"] != "fp":
            r["reference_name"] = a.reference_name  # the plot's axis names it
    return entries


def _comparison_caption(a: Analysis, runs: list[dict]) -> str:
    """Says where each point of the comparison plot comes from (which checkpoint, which data)."""
    data = a.dataset if a.data_root is None else f"{a.dataset} {a.data_root}"
    parts = [
        f"Top-1 against mean BitOPs relative to {a.reference_name} ({a.model_name} on "
        f"{data}). This run (circled): its analysed checkpoint {Path(a.checkpoint).name}"
    ]
    if a.fp_run is not None:
        parts.append(f"full-precision line: the FP run {a.fp_run} on these same {a.n} test images")
    # related_runs puts this run first; with --fp, the only FP entry is the analysed one.
    others = [r for r in runs[1:] if a.fp_run is None or r["recipe"] != "fp"]
    if others:
        fp = " (and the full-precision line)" if any(r["recipe"] == "fp" for r in others) else ""
        parts.append(
            f"the other runs{fp}: finished runs beside this one on the same model and data, "
            "at their final checkpoint as their summary.json records it"
        )
    return "; ".join(parts) + "."


def _tie_note(what: str, chosen: Tensor, a: Analysis) -> str:
    """A sentence when the gallery row cuts through a group of equally expensive images."""
    tie = boundary_tie(a, chosen)
    if tie is None:
        return ""
    rel, taken, total = tie
    return f" The {what} {len(chosen)} take {taken} of the {total} images that cost {rel:.3f}x."


def _swap_in(new: Path, out: Path) -> None:
    """Replace the folder ``out`` by ``new``; the old one is deleted only once ``new`` is in."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=".report-old-", dir=out.parent))
        out.rename(old / out.name)
    try:
        new.rename(out)
    except BaseException:  # Ctrl-C included: put the previous report back
        if old is not None:
            (old / out.name).rename(out)
            old.rmdir()
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except BaseException:  # interrupted: still leave no stray folder behind
            shutil.rmtree(old, ignore_errors=True)
            raise


def write_report(
    run_dir: str | Path,
    fp_run: str | Path | None = None,
    checkpoint: str = "last",
    overrides: list[str] | None = None,
    gallery_size: int = 8,
    progress: bool = True,
) -> dict[str, Path]:
    """Analyse a static or dynamic run and write ``report/`` inside its folder.

    Writes ``per_sample.csv``, the PNG plots, ``report.md``, a self-contained
    ``report.html`` (images embedded) and ``report.json`` (the figures in machine form).
    ``fp_run`` (a full-precision run on the same data) supplies the difficulty measure.
    The report is built in a temporary folder beside ``report/`` and swapped in when
    complete, so a failure leaves the previous report as it was (and no stale plot
    survives a success). Returns the written paths by name.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} not found")
    a = analyze(run_dir, fp_run, checkpoint, overrides, progress)
    out = run_dir / "report"
    tmp = Path(tempfile.mkdtemp(prefix=".report-new-", dir=run_dir))
    try:
        tmp.chmod(run_dir.stat().st_mode & 0o777)  # mkdtemp's 0700 would hide the report
        paths = _write_files(run_dir, tmp, a, gallery_size)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: out / p.name for k, p in paths.items()}


def _write_files(run_dir: Path, out: Path, a: Analysis, gallery_size: int) -> dict[str, Path]:
    """Every file of the report of ``a`` into the folder ``out``; returns them by name."""
    paths: dict[str, Path] = {"csv": write_csv(a, out / "per_sample.csv")}
    rho = correlations(a)
    primary = rho.get("fp_loss", rho["entropy"])
    quantiles = accuracy_by_quantile(a)
    m = a.metrics

    doc = _Doc(f"instaquant report: {a.name}")
    kind = "dynamic (DQ)" if a.recipe == "dynamic" else "static"
    bits = _bits_label(a.candidates, a.weight_bits)
    doc.p(
        f"Run {run_dir}: {kind} {bits} {a.model_name} on {a.dataset}; "
        f"checkpoint {a.checkpoint}; {a.n} test images."
    )
    doc.h2("Summary")
    rows = [
        ["top-1 accuracy", f"{m['top1']:.2f}%"],
        ["test loss", f"{m['loss']:.4f}"],
        ["mean BitOPs per image", f"{m['bitops_mean']:.4g} ({m['bitops_rel']:.3f}x)"],
        [
            "min / max BitOPs per image",
            f"{m['bitops_min']:.4g} / {m['bitops_max']:.4g} "
            f"({m['bitops_min'] / a.ref_bitops:.3f}x / {m['bitops_max'] / a.ref_bitops:.3f}x)",
        ],
        [f"{a.reference_name} reference", f"{a.ref_bitops:.4g} BitOPs (1x)"],
        ["mean bits (w, a averaged)", f"{m['bits_mean']:.2f}"],
    ]
    if a.budget_rel is not None:
        rows.append(["BitOPs budget target", f"{a.budget_rel:.3f}x"])
    if a.fp_top1 is not None:
        rows.append(["full-precision top-1 (same images)", f"{a.fp_top1:.2f}%"])
    doc.table(["measure", "value"], rows)
    doc.p(
        f"BitOPs convention: {a.convention}. Relative figures are to the {a.reference_name} model."
    )

    doc.h2("Does the controller spend more bits on harder images?")
    if a.fp_loss is not None:
        doc.p(
            f"Difficulty = the full-precision model's loss on each image (FP run {a.fp_run}), "
            "a measure independent of the quantized model."
        )
    else:
        doc.p(
            "Difficulty = the quantized model's own predictive entropy (no full-precision run "
            "given; pass --fp FP_RUN for an independent measure)."
        )
    if a.bitops_constant:
        doc.p("BitOPs are the same for every image, so no correlation is defined.")
    else:
        doc.p(
            f"Spearman rank correlation between per-image BitOPs and {a.difficulty_name}: "
            f"ρ = {_fmt_rho(primary)} over {a.n} images"
            + (
                f" (with the DQ model's own predictive entropy: ρ = {_fmt_rho(rho['entropy'])})."
                if "fp_loss" in rho
                else "."
            )
            + " Positive means harder images get more BitOPs."
        )
    qhead = ["BitOPs quantile", "images", "BitOPs range (x)", "mean BitOPs (x)", "top-1 %"]
    if a.fp_pred is not None:
        qhead.append("FP top-1 %")
    qhead.append(f"mean {a.difficulty_name}")
    qrows = []
    for q in quantiles:
        row = [
            q["bin"],
            q["n"],
            f"{q['bitops_rel_min']:.3f}-{q['bitops_rel_max']:.3f}",
            f"{q['bitops_rel_mean']:.3f}",
            f"{q['top1']:.2f}",
        ]
        if a.fp_pred is not None:
            row.append(f"{q['fp_top1']:.2f}")
        row.append(f"{q['difficulty_mean']:.4f}")
        qrows.append(row)
    doc.table(qhead, qrows)
    doc.p(
        "Quartiles by each image's average BitOPs rank; images of equal cost share a "
        "quartile, so quartiles can be unequal or missing."
    )
    if not a.bitops_constant:
        paths["difficulty"] = plot_bitops_vs_difficulty(
            a, out / "bitops_vs_difficulty.png", primary
        )
        doc.image(paths["difficulty"], f"Per-image BitOPs against {a.difficulty_name} percentile.")

    room = None if a.headroom is None else a.headroom.summary()
    if room is not None:
        _headroom_section(doc, a, room)

    doc.h2("Per-layer bit-widths")
    lrows = []
    usage = candidate_usage(a) if a.recipe == "dynamic" else None
    dyn_index = {name: i for i, name in enumerate(a.layer_names)}
    for info in a.layers:
        if info.role == "fp":
            lrows.append([info.name, "full precision", f"{info.macs:,}", "not counted"])
        elif info.role == "static" or usage is None:
            lrows.append([info.name, "fixed", f"{info.macs:,}", f"{info.bits[0]}-bit"])
        else:
            u = usage[dyn_index[info.name]]
            u = u.mean(0) if a.separate else u
            shares = " / ".join(
                f"{b}b {100 * float(s):.0f}%" for b, s in zip(a.candidates, u, strict=True)
            )
            lrows.append([info.name, "dynamic", f"{info.macs:,}", shares])
    doc.table(["layer", "role", "MACs per image", "bits (share of images)"], lrows)
    if a.separate:
        doc.p("Weights and activations choose separately; the table averages both.")
    if usage is not None:
        paths["usage"] = plot_candidate_usage(a, out / "candidate_usage.png")
        doc.image(
            paths["usage"], "Share of test images choosing each candidate, per dynamic layer."
        )
    else:
        doc.p("A static run: every image runs every layer at the same bit-width.")

    doc.h2("Per-image cost")
    paths["histogram"] = plot_bitops_histogram(a, out / "bitops_histogram.png")
    doc.image(paths["histogram"], "Histogram of per-image BitOPs (correct and wrong stacked).")
    cheap_idx: list[int] = []
    costly_idx: list[int] = []
    gallery = plot_gallery(a, out / "gallery.png", gallery_size)
    if a.bitops_constant:
        doc.p(
            f"Every test image costs the same ({float(a.bitops[0]):.4g} BitOPs, "
            f"{float(a.bitops_rel[0]):.3f}x), so there are no cheapest or most expensive "
            "images to show."
        )
    elif gallery is not None:
        paths["gallery"], cheap, costly = gallery
        cheap_idx, costly_idx = cheap.tolist(), costly.tolist()
        doc.image(paths["gallery"], "The cheapest and the most expensive test images.")
        doc.p(
            "Test-set indices (rows of per_sample.csv): cheapest "
            + ", ".join(map(str, cheap_idx))
            + "; most expensive "
            + ", ".join(map(str, costly_idx))
            + f". Ordered by BitOPs; {tie_break_rule(a)}."
            + _tie_note("cheapest", cheap, a)
            + _tie_note("most expensive", costly, a)
        )
    else:
        doc.p("The test images cannot be read back from this loader, so there is no gallery.")

    runs = related_runs(run_dir, a)
    comparison: list[dict] = []
    if len(runs) > 1:
        comparison = [{k: r.get(k) for k in ("name", "recipe", "top1", "bitops_rel")} for r in runs]
        doc.h2("Against the other runs")
        paths["accuracy"] = plot_accuracy_vs_bitops(
            runs, out / "accuracy_vs_bitops.png", f"{a.model_name} on {a.dataset}", a.name
        )
        doc.image(paths["accuracy"], _comparison_caption(a, runs))

    doc.h2("Files")
    doc.p(
        "per_sample.csv: one row per test image (index, label, prediction, correct, BitOPs, "
        "loss, confidence, entropy"
        + (", FP loss and confidence" if a.fp_loss is not None else "")
        + ", bits chosen per layer); report.json: the figures above in machine form."
    )

    summary = {
        "run": str(run_dir),
        "checkpoint": a.checkpoint,
        "fp_run": a.fp_run,
        "recipe": a.recipe,
        "samples": a.n,
        "metrics": {k: v for k, v in m.items() if k != "candidate_fraction"},
        "fp_top1": a.fp_top1,
        "reference_bits": a.ref_bits,
        "reference_bitops": a.ref_bitops,
        "difficulty": a.difficulty_name,
        "spearman": {k: (None if math.isnan(v) else v) for k, v in rho.items()},
        "accuracy_by_quantile": quantiles,
        "candidates": list(a.candidates),
        "candidate_usage": None if usage is None else usage.tolist(),
        "layers": a.layer_names,
        "gallery": {
            "cheapest": cheap_idx,
            "most_expensive": costly_idx,
            "tie_break": None if a.bitops_constant else tie_break_rule(a),
        },
        "comparison": comparison,
        "headroom": room,
        "bitops_convention": a.convention,
    }
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["md"] = out / "report.md"
    paths["md"].write_text(doc.markdown())
    paths["html"] = out / "report.html"
    paths["html"].write_text(doc.html())
    return paths


def _share_text(shares: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {'bits' if k != 'none' else 'right'} {100 * v:.1f}%" for k, v in shares.items()
    )


def _headroom_section(doc: _Doc, a: Analysis, room: dict) -> None:
    """What per-image bits could buy with these weights, and how much the controller takes."""
    doc.h2("How much could per-image bits buy?")
    doc.p(
        "The same shared weights with every dynamic layer at one candidate (uniform), the "
        "controller's choices, and two oracles: each image at its cheapest candidate that "
        "classifies it correctly (the cheapest overall where none does), and the monotone "
        "oracle, each image at the cheapest candidate from which every higher one is right "
        "(part of the first oracle's gain is luck: right at a low bit-width, wrong at a high one; "
        "two runs that differ only in their seed, at one bit-width, give such an oracle a gain "
        "too: benchmarks/seed_oracle.py measures both)."
    )
    rows = [
        [f"uniform {b}-bit", f"{t:.2f}", f"{r:.3f}x"]
        for b, t, r in zip(
            room["candidates"], room["uniform_top1"], room["uniform_bitops_rel"], strict=True
        )
    ]
    rows.append(
        ["controller", f"{room['controller_top1']:.2f}", f"{room['controller_bitops_rel']:.3f}x"]
    )
    if cascade := room.get("cascade"):  # summaries written before it have none
        cheap, dear = cascade["bits"]
        rows.append(
            [
                f"cascade: every image at {cheap}-bit, the {100 * cascade['again']:.0f}% least "
                f"confident again at {dear}-bit",
                f"{cascade['top1']:.2f}",
                f"{cascade['bitops_rel']:.3f}x",
            ]
        )
    if "layer_policy_top1" in room:  # summaries written before it have no layer policy
        rows.append(
            [
                "layer policy: every image at each layer's most frequent choice",
                f"{room['layer_policy_top1']:.2f}",
                f"{room['layer_policy_bitops_rel']:.3f}x",
            ]
        )
    rows.append(["oracle", f"{room['oracle_top1']:.2f}", f"{room['oracle_bitops_rel']:.3f}x"])
    rows.append(
        [
            "monotone oracle",
            f"{room['monotone_oracle_top1']:.2f}",
            f"{room['monotone_oracle_bitops_rel']:.3f}x",
        ]
    )
    doc.table(["assignment", "top-1 %", f"BitOPs (x {a.reference_name})"], rows)

    def share(x: float | None) -> str:
        return "undefined (the oracle is not above the front)" if x is None else f"{100 * x:.1f}%"

    def rho(x: float | None) -> str:
        return "undefined" if x is None else f"{x:+.3f}"

    doc.p(
        "Cheapest right candidate per image: "
        + _share_text(room["oracle_share"])
        + "; monotone: "
        + _share_text(room["monotone_oracle_share"])
        + "."
    )
    front = room["controller_front_top1"]
    doc.p(
        f"The uniform candidates' line gives {front:.2f}% at the controller's BitOPs; the "
        f"controller captures {share(room['captured_share'])} of the oracle's gain over that "
        f"line ({share(room['captured_share_monotone'])} of the monotone oracle's). Spearman ρ "
        f"of per-image BitOPs against the cheapest right candidate: "
        f"{rho(room['rho_cheapest_right'])}"
        + (
            f"; against the full-precision loss: {rho(room['rho_fp_loss'])}"
            if a.fp_loss is not None
            else ""
        )
        + f". Per-image BitOPs p10 / p90: {room['bitops_p10_rel']:.3f}x / "
        f"{room['bitops_p90_rel']:.3f}x (ratio {room['bitops_p90_over_p10']:.2f})."
    )
    if ranked := ranked_text(room):
        doc.p(ranked)


RANKED_SIGNALS = {
    "monotone_oracle": "the monotone oracle's order",
    "fp_loss": "the full-precision loss",
    "cheapest_confidence": "the cheapest candidate's confidence",
}


def ranked_text(room: dict) -> str:
    """What ranking the images by each difficulty signal buys at the controller's BitOPs."""
    parts = [
        f"{RANKED_SIGNALS.get(name, name)} {r['top1']:.2f}% ({r['bits'][0]}+{r['bits'][1]} bits)"
        for name, r in room.get("ranked_top1", {}).items()
    ]
    if not parts:
        return ""
    return (
        "The ceiling of a difficulty signal: the images sorted by it and split between two "
        "uniform candidates so that the mean BitOPs is the controller's (the best pair), a "
        f"random order giving the line's {room['controller_front_top1']:.2f}% on average: "
        + "; ".join(parts)
        + "."
    )


def report_headline(paths: dict[str, Path]) -> str:
    """One line for the terminal: where the report is and what the correlation came out at."""
    data = json.loads(paths["json"].read_text())
    rho = data["spearman"].get("fp_loss", data["spearman"]["entropy"])
    corr = "undefined" if rho is None else f"{rho:+.3f}"
    return (
        f"report: {paths['html']} (Spearman ρ of per-image BitOPs vs {data['difficulty']}: {corr})"
    )
