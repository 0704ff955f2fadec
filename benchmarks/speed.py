"""Cost of dynamic execution relative to the static quantized model, measured side by side.

Three models from the same full-precision network, in one process:

- static:    ``iq.static(fp, method="pact", bits=4)``
- fast:      ``iq.dynamic(fp, DynamicSpec(method="pact", bits=(3, 4, 5)))`` (default execution)
- reference: the same dynamic model with ``execution="reference"`` (every branch, forward and
  backward, as in the official code)

Before timing, one no-grad pass in training mode sets every batch norm's running statistics to
the benchmark batch's (a fresh model's unit statistics are not what evaluation sees) and
initialises the quantizers; no weight changes. The dynamic models keep the controller
``iq.dynamic`` builds; the script prints how its choices split the batch (candidate groups per
layer), since routing cost grows with the split. Training is timed first, then inference (in a
fresh process the first large allocations are slow, which distorts inference timings).

A training step is forward + cross-entropy (+ ``budget_loss()``) + backward + SGD step.
Inference is a forward under ``torch.no_grad()`` in eval mode, at batch 128 and batch 1
(batch 1 timed over a loop of calls). Each repeat times every model once, in an order that
rotates from repeat to repeat; a ratio is the median over repeats of the per-repeat ratio,
so slow drifts of the machine's speed cancel.

    python benchmarks/speed.py                 # both models, 7 repeats, 2 threads
    python benchmarks/speed.py --models resnet20 --repeats 5
    python benchmarks/speed.py --checkpoint runs/reproduce_cifar10/pact_dq_budget4/best.pt
    python benchmarks/speed.py --models resnet20 --runs 5   # medians over 5 fresh processes
    python benchmarks/speed.py --device cuda                 # on a GPU (no targets there)

``--checkpoint`` adds the inference of a trained dynamic model on its own test images, whose
controller splits the batch as training left it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import instaquant as iq

BITS = (3, 4, 5)
VARIANTS = ("static", "fast", "reference")
# Targets of issue 4 (ResNet-20, K = 3, batch 128, 2 CPU threads).
TARGETS = {"train": 1.8, "infer": 1.15, "infer_b1": 1.2}


@dataclass
class Setup:
    name: str
    build: Callable[[], nn.Module]
    size: int
    batch: int
    targets: bool


SETUPS = {
    "resnet20": Setup("resnet20", lambda: iq.models.resnet20(num_classes=10), 32, 128, True),
    # 64x64 input keeps a CPU training step around a few seconds.
    "resnet18": Setup(
        "resnet18", lambda: iq.models.get("resnet18", num_classes=100), 64, 128, False
    ),
}


def build_models(setup: Setup) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fp = setup.build()
    example = torch.randn(1, 3, setup.size, setup.size)
    spec = iq.DynamicSpec(method="pact", bits=BITS)
    fast = iq.dynamic(fp, spec, example_input=example)
    reference = copy.deepcopy(fast)
    for layer in reference.dynamic_modules():
        layer.execution = "reference"
    static = iq.static(fp, method="pact", bits=BITS[1], example_input=example)
    return {"static": static, "fast": fast, "reference": reference}


def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Batch-norm statistics of ``x`` (a fresh model's unit statistics leave activations unscaled),
    and lazily initialised quantizer ranges; no weight changes."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0  # one pass sets the running statistics to the batch's
    model.train()
    with torch.no_grad():
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    model.train()
    loss = F.cross_entropy(model(x), y) + model.budget_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def infer(model: nn.Module, x: torch.Tensor, calls: int = 1) -> None:
    model.eval()
    with torch.no_grad():
        for _ in range(calls):
            model(x)


def no_wait() -> None:
    """CPU work is done when the call returns."""


def timed(fn: Callable[[], None], wait: Callable[[], None] = no_wait) -> float:
    """Seconds ``fn`` takes; ``wait`` blocks until queued device work is done (GPU)."""
    wait()
    start = time.perf_counter()
    fn()
    wait()
    return time.perf_counter() - start


def interleaved(
    jobs: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    wait: Callable[[], None] = no_wait,
) -> dict[str, list[float]]:
    """Seconds per job and repeat; every repeat runs each job once, the order rotating."""
    names = list(jobs)
    for _ in range(warmup):
        for name in names:
            jobs[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(jobs[name], wait))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def choice_summary(bits: torch.Tensor) -> str:
    """Bit shares and the mean number of candidate groups per layer in a ``[B, L]`` choice."""
    shares = " ".join(f"{b}b {float((bits == b).float().mean()):.0%}" for b in BITS)
    groups = statistics.mean(len(torch.unique(bits[:, i])) for i in range(bits.shape[1]))
    return f"{shares}, {groups:.2f} candidate groups per layer"


def varied_batch(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    """Random images whose contrast and brightness differ per sample, as real images do."""
    g = torch.Generator().manual_seed(seed)
    contrast = torch.linspace(0.2, 3.0, batch)[torch.randperm(batch, generator=g)]
    x = torch.randn(batch, 3, size, size, generator=g) * contrast.view(batch, 1, 1, 1)
    return x + torch.randn(batch, 3, 1, 1, generator=g)


def trained_models(
    setup: Setup,
    repeats: int,
    fmt: torch.memory_format,
    device: torch.device,
    wait: Callable[[], None] = no_wait,
) -> tuple[dict[str, nn.Module], torch.Tensor, dict[str, list[float]]]:
    """The three models and the batch, batch norms calibrated, after ``repeats`` interleaved
    training steps each (also returned, as timings).

    Training comes first because it brings the process to its steady state (allocator,
    caches), which inference timed in a fresh process does not have.
    """
    models = {n: m.to(device, memory_format=fmt) for n, m in build_models(setup).items()}
    x = varied_batch(setup.batch, setup.size).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (setup.batch,), generator=torch.Generator().manual_seed(1))
    y = y.to(device)
    for model in models.values():
        calibrate(model, x)
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in models.items()}
    train = interleaved(
        {n: (lambda m=m, o=opts[n]: train_step(m, o, x, y)) for n, m in models.items()},
        repeats,
        wait=wait,
    )
    return models, x, train


def run(
    setup: Setup,
    repeats: int,
    b1_calls: int,
    fmt: torch.memory_format,
    device: torch.device | None = None,
) -> list[tuple[str, float, float | None]]:
    device = device or torch.device("cpu")
    wait = torch.cuda.synchronize if device.type == "cuda" else no_wait
    print(
        f"\n## {setup.name}, {setup.size}x{setup.size} input, batch {setup.batch}, bits {BITS}, "
        f"{str(fmt).removeprefix('torch.')}, {device.type}"
    )
    models, x, train = trained_models(setup, repeats, fmt, device, wait)
    x1 = x[:1].clone()
    print("training choices (last step): " + choice_summary(models["fast"].last.bits_w))
    infer(models["fast"], x)
    print("evaluation choices:           " + choice_summary(models["fast"].last.bits_w))
    inf = interleaved({n: (lambda m=m: infer(m, x)) for n, m in models.items()}, repeats, wait=wait)
    inf1 = interleaved(
        {n: (lambda m=m: infer(m, x1, b1_calls)) for n, m in models.items()}, repeats, wait=wait
    )
    # The same dynamic model with every layer forced to one candidate: the cost of the
    # controller and bookkeeping alone, without splitting the batch.
    fast = models["fast"]
    middle = [BITS[len(BITS) // 2]] * len(fast.dynamic_layers)

    def forced() -> None:
        with fast.forced_bits(middle):
            infer(fast, x)

    inf_forced = interleaved(
        {"static": lambda: infer(models["static"], x), "forced": forced}, repeats, wait=wait
    )

    for label, t, scale, unit in (
        ("train step", train, 1.0, "s"),
        (f"inference b{setup.batch}", inf, 1.0, "s"),
        ("inference b1", inf1, 1e3 / b1_calls, "ms"),
    ):
        med = {n: statistics.median(t[n]) * scale for n in VARIANTS}
        print(f"{label:>16}: " + "  ".join(f"{n} {med[n]:.4g} {unit}" for n in VARIANTS))

    # The targets are for this project's 2-core CPU.
    on_target = setup.targets and device.type == "cpu"
    target = (lambda key: TARGETS[key]) if on_target else (lambda key: None)
    b = setup.batch
    return [
        ("train step dynamic/static", ratio(train, "fast", "static"), target("train")),
        (f"inference b{b} dynamic/static", ratio(inf, "fast", "static"), target("infer")),
        ("inference b1 dynamic/static", ratio(inf1, "fast", "static"), target("infer_b1")),
        (
            f"inference b{b} dynamic forced to one candidate/static",
            ratio(inf_forced, "forced", "static"),
            None,
        ),
        ("train step reference/fast", ratio(train, "reference", "fast"), None),
        (f"inference b{b} reference/fast", ratio(inf, "reference", "fast"), None),
        ("inference b1 reference/fast", ratio(inf1, "reference", "fast"), None),
        ("train step reference/static", ratio(train, "reference", "static"), None),
        (f"inference b{b} reference/static", ratio(inf, "reference", "static"), None),
    ]


def run_checkpoint(path: str, repeats: int, b1_calls: int) -> list[tuple[str, float, None]]:
    """Inference of a trained dynamic model (a training run's checkpoint) on its test images,
    against a static model of the same architecture at the middle candidate's bits."""
    from instaquant.builder import load_for_eval  # the training stack: only for this option

    cfg, model, extra = load_for_eval(path, ["data.workers=0"])
    if not isinstance(model, iq.DynamicQuantModel):
        raise SystemExit(f"{path} does not hold a dynamic model")
    spec, info = model.spec, extra["info"]
    x = next(iter(extra["test_loader"]))[0][:128].contiguous()
    fp = iq.models.get(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels)
    bits = spec.bits[len(spec.bits) // 2]
    static = iq.static(fp, spec.method, bits, example_input=x[:1], first_last=spec.first_last)
    calibrate(static, x)
    # Steady state first (a fresh process's first large allocations are slow): a few training
    # steps of a throw-away copy.
    scratch = copy.deepcopy(static)
    opt = torch.optim.SGD(scratch.parameters(), lr=0.0)
    for _ in range(3):
        train_step(scratch, opt, x, torch.zeros(x.shape[0], dtype=torch.long))
    del scratch
    model.eval()
    print(f"\n## {path}: {x.shape[0]} test images, bits {spec.bits} vs static {bits}")
    infer(model, x)
    print("evaluation choices: " + choice_summary(model.last.bits_w))
    pair = {"static": static, "fast": model}
    inf = interleaved({n: (lambda m=m: infer(m, x)) for n, m in pair.items()}, repeats)
    inf1 = interleaved(
        {n: (lambda m=m: infer(m, x[:1], b1_calls)) for n, m in pair.items()}, repeats
    )
    b = x.shape[0]
    return [
        (f"inference b{b} dynamic/static", ratio(inf, "fast", "static"), None),
        ("inference b1 dynamic/static", ratio(inf1, "fast", "static"), None),
    ]


def print_table(rows: list[list], spread: dict[tuple[str, str], list[float]] | None = None) -> int:
    """The ratio table with verdicts; returns the number of missed targets."""
    print("\n| model | ratio | measured | target |\n|---|---|---|---|")
    missed = 0
    for model, label, value, target in rows:
        verdict = ""
        if target is not None:
            ok = value <= target
            missed += not ok
            verdict = f"<= {target} {'met' if ok else 'MISSED'}"
        shown = f"{value:.2f}x"
        if spread:
            values = spread[(model, label)]
            shown += f" ({min(values):.2f}-{max(values):.2f})"
        print(f"| {model} | {label} | {shown} | {verdict} |")
    print("\nall targets met" if missed == 0 else f"\n{missed} target(s) missed")
    return missed


def without_runs(argv: list[str]) -> list[str]:
    """``argv`` less its ``--runs N`` / ``--runs=N``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--runs":
            skip = True
        elif not arg.startswith("--runs="):
            kept.append(arg)
    return kept


def across_processes(argv: list[str], runs: int) -> None:
    """The benchmark in ``runs`` fresh processes, one after the other; medians over them.

    The machine's state moves the batch-128 ratio between two bands every few seconds
    (``ratio_over_time.py``; docs/benchmarks.md), so one process, about 20 seconds of timing,
    can land high or low; fresh processes spread over a longer time.
    """
    per_run: list[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, __file__, *without_runs(argv), "--json", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            per_run.append(json.loads(out.read_text()))
            print(f"process {i + 1}/{runs} done", flush=True)
    spread: dict[tuple[str, str], list[float]] = {}
    for rows in per_run:
        for model, label, value, _ in rows:
            spread.setdefault((model, label), []).append(value)
    medians = [
        [model, label, statistics.median(spread[(model, label)]), target]
        for model, label, _, target in per_run[0]
    ]
    print(f"\nmedian over {runs} processes (lowest-highest process in brackets):")
    print_table(medians, spread)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (>= 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--b1-calls", type=int, default=20, help="batch-1 calls per repeat")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="models and inputs in channels_last memory format (faster convolutions on CPU)",
    )
    parser.add_argument(
        "--checkpoint",
        help="also time inference of this trained dynamic model (a run's best.pt) on its data",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole benchmark in this many fresh processes and report medians",
    )
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the models run"
    )
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # one process's rows
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    if args.device == "cuda" and args.checkpoint:
        parser.error("--checkpoint runs on the CPU only; leave out --device cuda")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads of {os.cpu_count()} CPUs, "
        f"{platform.machine()}, PACT, {args.repeats} interleaved repeats "
        "(median of per-repeat ratios)"
    )
    # Other processes on the machine distort timings; say how busy it was.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    if args.runs > 1:
        across_processes(argv, args.runs)
    else:
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        rows = []
        for name in args.models:
            found = run(SETUPS[name], args.repeats, args.b1_calls, fmt, device)
            rows += [[name, *r] for r in found]
        if args.checkpoint:
            rows += [
                ["trained", *r]
                for r in run_checkpoint(args.checkpoint, args.repeats, args.b1_calls)
            ]
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps(rows))
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
