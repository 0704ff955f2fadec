"""The ``instaquant`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="instaquant", description="Instance-aware dynamic quantization"
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="full precision, static and DQ on the embedded digits")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a config")
    t.add_argument("-c", "--config", required=True)
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=1 data.limit=512")
    t.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    t.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop after epoch N with a resumable checkpoint (time-sliced jobs)",
    )
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a checkpoint (a .pt file, or a run folder: its best.pt, else last.pt)")
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the stored config")
    e.add_argument("--data", help="dataset name (digits, cifar10, cifar100, imagefolder)")
    e.add_argument("--root", help="dataset root folder")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    c = sub.add_parser("compare", help="table and accuracy-vs-BitOPs plot of runs")
    c.add_argument("runs", nargs="+", help="run folders (or summary.json files)")
    c.add_argument("--plot", default="accuracy_vs_bitops.png", help="PNG to write")

    r = sub.add_parser("report", help="per-sample analysis, plots and report.html of a run")
    r.add_argument("run", help="run folder of a static or dynamic run")
    r.add_argument("--fp", help="full-precision run on the same data (difficulty = its loss)")
    r.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help="which one (default last)"
    )
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. device=cpu")

    k = sub.add_parser("cost", help="per-layer MACs / BitOPs table of a config")
    k.add_argument("-c", "--config", required=True)
    k.add_argument("overrides", nargs="*")
    return p


def _train(args: argparse.Namespace) -> None:
    from . import config as config_mod
    from .engine import fit

    cfg = config_mod.load(args.config, args.overrides)
    entry = fit(
        cfg,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after_epoch=args.stop_after_epoch,
    )
    if entry:
        print(json.dumps(entry, indent=2))


def _eval(args: argparse.Namespace) -> None:
    from .builder import load_for_eval
    from .evaluation import evaluate

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.name={args.data}")
    if args.root:
        overrides.append(f"data.root={args.root}")
    cfg, model, extra = load_for_eval(args.checkpoint, overrides)
    result = evaluate(model, extra["test_loader"], cfg.ref_bits, progress=True)
    m = {k: v for k, v in result.metrics.items() if k != "candidate_fraction"}
    recorded = extra["ckpt"].get("metrics", {}).get("test_top1")
    if args.json:
        print(json.dumps({**m, "recorded_top1": recorded}, indent=2))
        return
    line = f"top1 {m['top1']:.2f}%  top5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['samples']} images)"
    if "bitops_rel" in m:
        line += (
            f"\nBitOPs mean {m['bitops_mean']:.4g} (min {m['bitops_min']:.4g}, max {m['bitops_max']:.4g}),"
            f" {m['bitops_rel']:.3f}x of static {cfg.ref_bits}-bit; mean bits {m['bits_mean']:.2f}"
        )
    if recorded is not None:
        line += f"\nrecorded at training: top1 {recorded:.2f}%"
    print(line)
    fraction = result.metrics.get("candidate_fraction")
    if fraction:
        names = [i.name for i in model.dynamic_layers]
        bits = cfg.quant.bits
        print("share of images per candidate (" + ", ".join(f"{b}-bit" for b in bits) + "):")
        for name, row in zip(names, fraction, strict=True):
            print(f"  {name:<32} " + "  ".join(f"{100 * v:5.1f}%" for v in _flat(row, len(bits))))


def _flat(row: list, k: int) -> list[float]:
    """A layer's candidate shares (averaged over weights/activations when chosen separately)."""
    if row and isinstance(row[0], list):
        return [sum(r[i] for r in row) / len(row) for i in range(k)]
    return row


def _compare(args: argparse.Namespace) -> None:
    from .demo import format_table
    from .report import plot_accuracy_vs_bitops

    runs = []
    for item in args.runs:
        path = Path(item)
        path = path / "summary.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"no summary.json at {str(path)!r} (is the run finished?)")
        runs.extend(json.loads(path.read_text())["runs"])
    print(format_table(runs))
    print(f"wrote {plot_accuracy_vs_bitops(runs, args.plot)}")


def _report(args: argparse.Namespace) -> None:
    from .report import report_headline, write_report

    if args.fp is not None and not Path(args.fp).exists():
        raise UserError(f"--fp run {args.fp!r} not found")
    paths = write_report(args.run, args.fp, args.checkpoint, args.overrides)
    print(report_headline(paths))
    print(f"wrote {paths['md']}, {paths['csv']} and the plots in {paths['md'].parent}")


def _cost(args: argparse.Namespace) -> None:
    import torch

    from . import config as config_mod
    from .builder import build_model, example_input
    from .cost import profile
    from .data import describe

    cfg = config_mod.load(args.config, args.overrides)
    info = describe(cfg.data)
    model = build_model(cfg, info, torch.device("cpu"), load_init=False)
    prof = profile(model, example_input(info))
    print(prof.to_table())
    if cfg.recipe != "fp":
        ref = prof.bitops(cfg.ref_bits)
        print(f"static {cfg.ref_bits}-bit reference: {ref:.4g} BitOPs per image")


def main(argv: list[str] | None = None) -> int:
    from .engine import RunInterruptedError

    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, progress=not args.no_progress)
        else:
            commands = {
                "train": _train,
                "eval": _eval,
                "compare": _compare,
                "cost": _cost,
                "report": _report,
            }
            commands[args.command](args)
    except RunInterruptedError as err:
        print(f"instaquant: {err}", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"instaquant: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instaquant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
