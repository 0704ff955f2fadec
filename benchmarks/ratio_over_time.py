"""How the batch-128 inference ratio dynamic/static moves with the machine's state over time.

``speed.py`` reports one ratio per process; on this 2-core virtual machine that ratio lands in
one of two bands (about 1.13 and about 1.20 for ResNet-20 split three ways) and the band can
change in the middle of a process. This script shows it: the static and the dynamic model of
``speed.py``, brought to the same steady state, are timed in consecutive rounds (each round a
median over interleaved repeats) and every round's times and ratio are printed, so one can
see which model's time moves when the ratio does.

    python benchmarks/ratio_over_time.py                      # 30 rounds, ResNet-20
    python benchmarks/ratio_over_time.py --rounds 60 --plot ratio_over_time.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import speed  # benchmarks/speed.py, next to this file
import torch


@dataclass
class Round:
    seconds: float  # since the first round started
    static_ms: float
    dynamic_ms: float
    ratio: float  # median over the round's repeats of the per-repeat ratio


def timed_rounds(setup: speed.Setup, rounds: int, repeats: int) -> list[Round]:
    """``rounds`` consecutive timings of inference (static and fast), printed as they come."""
    models, x, _ = speed.trained_models(setup, 7, torch.contiguous_format, torch.device("cpu"))
    speed.infer(models["fast"], x)
    print("evaluation choices: " + speed.choice_summary(models["fast"].last.bits_w))
    jobs = {n: (lambda m=models[n]: speed.infer(m, x)) for n in ("static", "fast")}
    print("round  seconds  static ms  dynamic ms  ratio")
    found, start = [], time.perf_counter()
    for i in range(rounds):
        t = speed.interleaved(jobs, repeats, warmup=1)
        r = Round(
            time.perf_counter() - start,
            statistics.median(t["static"]) * 1e3,
            statistics.median(t["fast"]) * 1e3,
            speed.ratio(t, "fast", "static"),
        )
        print(
            f"{i + 1:5d}  {r.seconds:7.1f}  {r.static_ms:9.1f}  {r.dynamic_ms:10.1f}  {r.ratio:5.3f}"
        )
        found.append(r)
    return found


def summary(found: list[Round], target: float) -> list[str]:
    """The ratio's median and range, and the two models' times in the rounds on each side of
    the target: whether a round meets it because the dynamic model ran faster or the static
    one slower."""
    ratios = [r.ratio for r in found]
    lines = [
        f"ratio: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
    ]
    for label, part in (
        (f"rounds <= {target}", [r for r in found if r.ratio <= target]),
        (f"rounds > {target}", [r for r in found if r.ratio > target]),
    ):
        if part:
            lines.append(
                f"{label} ({len(part)} of {len(found)}): static {statistics.median(r.static_ms for r in part):.1f} ms, "
                f"dynamic {statistics.median(r.dynamic_ms for r in part):.1f} ms (medians)"
            )
    return lines


def plot(found: list[Round], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [r.seconds for r in found]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(seconds, [r.static_ms for r in found], "o-", label="static")
    top.plot(seconds, [r.dynamic_ms for r in found], "o-", label="dynamic (fast)")
    top.set_ylabel("ms per batch-128 forward")
    top.legend()
    bottom.plot(seconds, [r.ratio for r in found], "o-", color="black")
    bottom.axhline(target, color="red", linestyle="--", label=f"target {target}")
    bottom.set_ylabel("dynamic / static")
    bottom.set_xlabel("seconds since the first round")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=list(speed.SETUPS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="also draw the rounds into this PNG file")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    target = speed.TARGETS["infer"]
    found = timed_rounds(speed.SETUPS[args.model], args.rounds, args.repeats)
    print("\n".join(summary(found, target)))
    if args.plot:
        plot(found, target, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
