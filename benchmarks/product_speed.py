"""What quantizing the attention products (``product_bits``) costs in time, side by side.

Two static LSQ 4-bit models of ``iq.models.vit_cifar`` in one process, the same weights:
full-precision products (``scaled_dot_product_attention``) and products quantized at
``--product-bits`` (both operands of q·kᵀ and attention·v, the attention written out so
that its weights can be quantized). Times a training step (forward, cross-entropy, backward,
SGD step) and a no-grad evaluation forward; each repeat times both models in a rotating
order, and a ratio is the median over repeats of the per-repeat ratio.

    python benchmarks/product_speed.py                  # batch 64, 7 repeats, 2 threads
"""

from __future__ import annotations

import argparse
import statistics

import torch
from speed import calibrate, infer, interleaved, ratio, train_step

import instaquant as iq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--product-bits", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = iq.models.vit_cifar()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    models = {
        "fp products": iq.static(fp, "lsq", 4, x[:2]),
        "quantized products": iq.static(fp, "lsq", 4, x[:2], product_bits=args.product_bits),
    }
    for model in models.values():
        calibrate(model, x)  # quantizer ranges set from this batch
    optims = {n: torch.optim.SGD(m.parameters(), lr=1e-4) for n, m in models.items()}
    print(
        f"vit_cifar, static LSQ 4-bit, products at {args.product_bits} bits, batch {args.batch}, "
        f"{args.threads} threads, {args.repeats} repeats"
    )
    rows = []
    for what, job in (
        ("training step", lambda n: train_step(models[n], optims[n], x, y)),
        ("inference", lambda n: infer(models[n], x)),
    ):
        times = interleaved({n: (lambda n=n, job=job: job(n)) for n in models}, args.repeats)
        ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        r = ratio(times, "quantized products", "fp products")
        rows.append(
            f"{what:<14} {ms['fp products']:9.1f} ms {ms['quantized products']:9.1f} ms  {r:.2f}x"
        )
    print(f"{'':<14} {'fp products':>12} {'quantized':>12}  ratio")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
