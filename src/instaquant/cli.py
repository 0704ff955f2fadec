"""The ``instaquant`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .config import UserError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn


def _at_least_one(what: str):
    """An argparse type: a whole number >= 1, refused in one line naming ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected {what} >= 1, got {text!r}")
        return value

    return parse


BITS_HELP = (
    "a DQ run with fixed bits and no controller: 'policy' (each dynamic layer's most "
    "frequent choice on the test images), one candidate for every layer, or one per layer "
    "(3,3,2,4,...)"
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top parser and each command's own parser (see :func:`_parse`)."""
    p = argparse.ArgumentParser(
        prog="instaquant", description="Instance-aware dynamic quantization"
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="full precision, static and DQ on the embedded digits")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted demo in --out (finished runs are kept)",
    )
    d.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a config")
    t.add_argument("-c", "--config", required=True)
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=1 data.limit=512")
    t.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    t.add_argument(
        "--stop-after-epoch",
        type=_at_least_one("an epoch number"),  # 0 would stop nothing
        metavar="N",
        help="stop after epoch N with a resumable checkpoint (time-sliced jobs)",
    )
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (a .pt file, or a run folder: its best.pt, else last.pt)",
    )
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the stored config")
    e.add_argument("--data", help="dataset name (digits, cifar10, cifar100, imagefolder)")
    e.add_argument("--root", help="dataset root folder")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--bits", help=BITS_HELP)

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

    x = sub.add_parser(
        "export",
        help="export a run's quantized model as ONNX or torch.export (controller inside, or --bits)",
    )
    x.add_argument("checkpoint", help="a run folder (its best.pt, else last.pt) or a .pt file")
    x.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    x.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    x.add_argument(
        "--batch",
        type=_at_least_one("a number"),
        default=1,
        help="batch size of the graph's input (default 1)",
    )
    x.add_argument("--bits", help=BITS_HELP + "; the graph then holds no controller")
    x.add_argument("overrides", nargs="*", help="key=value overrides of the stored config")

    k = sub.add_parser("cost", help="per-layer MACs / BitOPs table of a config")
    k.add_argument("-c", "--config", required=True)
    k.add_argument("overrides", nargs="*")
    return p, sub.choices


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with key=value overrides (and run folders) allowed among the options.

    argparse cannot intermix positionals and options under subparsers, so the top parser
    only finds the command, and the command's own parser reads the rest intermixed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parser()
    command = parser.parse_known_args(argv)[0].command
    args = commands[command].parse_intermixed_args(argv[argv.index(command) + 1 :])
    args.command = command
    return args


def _make_dir(path: Path, what: str) -> None:
    """Create an output folder up front, so that a path that cannot be one fails in one line
    before any work is done."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as err:  # a parent that may not be searched
        raise UserError(
            f"{what} {str(path)!r} cannot be reached ({err.strerror}); give a writable folder path"
        ) from None
    if not existing.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is a file; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{what} {str(path)!r} cannot be created ({err.strerror}); give a writable folder path"
        ) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{what} {str(path)!r} is not writable; give a writable folder path")


def _train(args: argparse.Namespace) -> None:
    from . import config as config_mod
    from .engine import fit, run_dir

    cfg = config_mod.load(args.config, args.overrides)
    _make_dir(run_dir(cfg), "run folder (out=)")
    entry = fit(
        cfg,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after_epoch=args.stop_after_epoch,
    )
    if entry:
        print(json.dumps(entry, indent=2))


def _export(args: argparse.Namespace) -> None:
    from .builder import example_input, load_for_eval
    from .convert import QuantModel
    from .export import OUTPUT_NAMES, export

    cfg, model, extra = load_for_eval(args.checkpoint, list(args.overrides))
    if not isinstance(model, QuantModel):
        raise UserError(f"{args.checkpoint!r} is a full-precision run: nothing quantized to export")
    example = example_input(extra["info"])[:1].expand(args.batch, -1, -1, -1).contiguous()
    with _fixed_bits(args, model, extra["test_loader"]):
        path = export(model.cpu(), example, args.out, args.format)
    print(
        f"wrote {path} ({args.format}): input images {list(example.shape)}, "
        f"outputs {', '.join(OUTPUT_NAMES)}"
    )


def _eval(args: argparse.Namespace) -> None:
    from .builder import load_for_eval
    from .evaluation import evaluate

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.name={args.data}")
    if args.root:
        overrides.append(f"data.root={args.root}")
    cfg, model, extra = load_for_eval(args.checkpoint, overrides)
    with _fixed_bits(args, model, extra["test_loader"]):
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
        chooser = "" if args.bits is None else ", with the controller choosing"
        line += f"\nrecorded at training{chooser}: top1 {recorded:.2f}%"
    print(line)
    fraction = result.metrics.get("candidate_fraction")
    if fraction:
        names = [i.name for i in model.dynamic_layers]
        bits = cfg.quant.bits
        print("share of images per candidate (" + ", ".join(f"{b}-bit" for b in bits) + "):")
        for name, row in zip(names, fraction, strict=True):
            print(f"  {name:<32} " + "  ".join(f"{100 * v:5.1f}%" for v in _flat(row, len(bits))))


def _fixed_bits(
    args: argparse.Namespace, model: nn.Module, batches: Iterable
) -> contextlib.AbstractContextManager:
    """The model at ``--bits`` (printed, layer by layer), or as it is when none is given."""
    from .convert import DynamicQuantModel
    from .policy import describe, resolve_bits, static_layer_bits

    if args.bits is None:
        return contextlib.nullcontext()
    if not isinstance(model, DynamicQuantModel):
        raise UserError(
            f"--bits fixes the bits of a DQ run, and {args.checkpoint!r} is not one "
            "(a static or full-precision run has its bits already)"
        )
    bits = resolve_bits(args.bits, model, batches)
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout  # keep --json parseable
    text = f"every image at fixed bits ({args.bits}), no controller:\n{describe(bits, model)}"
    layer_bits = static_layer_bits(bits, model)
    if layer_bits is not None:  # to train the same mixed precision as a static model
        spec = model.spec
        fixed = f"quant.bits=[{spec.fixed_bits}]" + (
            f" quant.weight_bits={spec.weight_bits}" if spec.weight_bits is not None else ""
        )
        mapping = ", ".join(f"{name}: {b}" for name, b in layer_bits.items())
        text += (
            f"\nas static mixed precision (config keys): {fixed} 'quant.layer_bits={{{mapping}}}'"
        )
    print(text, file=stream)
    return model.forced_bits(*bits)


def _flat(row: list, k: int) -> list[float]:
    """A layer's candidate shares (averaged over weights/activations when chosen separately)."""
    if row and isinstance(row[0], list):
        return [sum(r[i] for r in row) / len(row) for i in range(k)]
    return row


def _summary_runs(path: Path) -> list[dict]:
    """The run entries of a summary.json, with the keys the table and the plot read."""
    needed = ("name", "recipe", "method", "bits", "top1")
    hint = "give a run folder or the summary.json that train or demo wrote"
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}); {hint}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{str(path)!r} holds no list of runs under 'runs'; {hint}")
    for i, run in enumerate(runs):
        missing = [k for k in needed if not isinstance(run, dict) or k not in run]
        if missing:
            raise UserError(
                f"{str(path)!r}: run {i} lacks {', '.join(missing)}; "
                f"each run needs {', '.join(needed)}"
            )
    return runs


def _compare(args: argparse.Namespace) -> None:
    from .demo import common_reference, format_table
    from .report import plot_accuracy_vs_bitops

    runs = []
    for item in args.runs:
        path = Path(item)
        path = path / "summary.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"no summary.json at {str(path)!r} (is the run finished?)")
        runs.extend(_summary_runs(path))
    _make_dir(Path(args.plot).parent, "--plot folder")
    print(format_table(runs))
    try:
        plot = plot_accuracy_vs_bitops(common_reference(runs)[0], args.plot)
    except OSError as err:
        raise UserError(
            f"cannot write the plot {args.plot!r} ({err.strerror}); "
            "give --plot a .png path in a writable folder"
        ) from None
    print(f"wrote {plot}")


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
    # Costing needs no data: an absent image folder is taken as ImageNet's 1000 classes.
    info = describe(cfg.data, absent_classes=1000)
    if cfg.data.name == "imagefolder" and not Path(cfg.data.root).exists():
        print(
            f"note: data.root {cfg.data.root!r} is absent: costed at {info.image_size} px "
            "with 1000 classes"
        )
    model = build_model(cfg, info, torch.device("cpu"), load_init=False)
    prof = profile(model, example_input(info))
    print(prof.to_table())
    if cfg.recipe != "fp":
        ref = prof.reference_bitops(cfg.ref_bits)
        print(f"static {cfg.ref_bits}-bit reference: {ref:.4g} BitOPs per image")


def main(argv: list[str] | None = None) -> int:
    from .engine import RunInterruptedError

    args = _parse(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            _make_dir(Path(args.out), "--out folder")
            run_demo(args.out, progress=not args.no_progress, resume=args.resume)
        else:
            commands = {
                "train": _train,
                "eval": _eval,
                "compare": _compare,
                "cost": _cost,
                "report": _report,
                "export": _export,
            }
            commands[args.command](args)
    except RunInterruptedError as err:
        print(f"instaquant: {err}", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"instaquant: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instaquant: interrupted; checkpoints on disk are intact", file=sys.stderr)
        return 130
    return 0


def run() -> NoReturn:
    """The ``instaquant`` command: :func:`main`'s exit status, ending a torchrun rank through
    :func:`instaquant.distributed.finish_process`."""
    from .distributed import finish_process, launched_distributed

    code = main()
    if launched_distributed():
        finish_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
