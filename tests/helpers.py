"""Small data the tests make themselves."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import instaquant as iq
from instaquant import distributed


def make_image_folder(
    root: Path, classes=("cat", "dog", "frog"), per_class=6, size=16, splits=("train", "val")
) -> Path:
    """An ImageFolder tree of random PNG images whose mean colour depends on the class."""
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = torch.randint(0, 100, (3, size, size), generator=gen, dtype=torch.uint8)
                img[c % 3] += 120
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


# --------------------------------------------------------------------------- dynamic models


def dynamic_resnet20(method="pact", separate=False, bias=None, device="cpu", **spec_kw):
    """A float64 dynamic ResNet-20 (candidates 3, 4, 5 bits) whose controller splits a batch.

    Its controller weights are scaled up so that samples choose differently; with ``bias``
    (one logit per candidate) one candidate is far ahead and every sample picks it.
    """
    fp = iq.models.resnet20(num_classes=10)
    spec = iq.DynamicSpec(method=method, bits=(3, 4, 5), separate=separate, **spec_kw)
    model = iq.dynamic(fp, spec, example_input=torch.randn(1, 3, 16, 16)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in (model.controller.fc1, model.controller.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 3.0)
            lin.bias.zero_()
        if bias is not None:
            fc2 = model.controller.fc2
            fc2.weight.zero_()
            fc2.bias.copy_(bias.repeat(fc2.bias.numel() // bias.numel()))
    return model.to(device)


def varied_images(n, seed=0, device="cpu"):
    """``n`` float64 16x16 images whose contrast and brightness differ per sample."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)
    x = torch.randn(n, 3, 16, 16, generator=g) * scale + torch.randn(n, 3, 1, 1, generator=g)
    return x.double().to(device)


def seeded_train_step(model, x, y, seed=5):
    """Forward, loss with the budget term, backward; the seed fixes Gumbel noise and dropout."""
    torch.manual_seed(seed)
    out = model(x)
    (F.cross_entropy(out, y) + model.budget_loss()).backward()
    return out


def assert_models_match(fast, ref, x, y):
    """One training step of ``fast`` (default execution) and ``ref`` (switched to the reference
    mixture here): exactly the same output and selection, and the same gradient on every
    parameter to float64 rounding. Returns ``fast.last``."""
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    out_f, out_r = seeded_train_step(fast, x, y), seeded_train_step(ref, x, y)
    torch.testing.assert_close(out_f, out_r, atol=0, rtol=0)
    torch.testing.assert_close(fast.last.selection, ref.last.selection, atol=0, rtol=0)
    named_r = dict(ref.named_parameters())
    checked = 0
    for name, p in fast.named_parameters():
        q = named_r[name]
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-11, rtol=1e-9, msg=name)
            checked += 1
    assert checked == sum(p.grad is not None for p in named_r.values()) > 50
    return fast.last


def free_port():
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finishing(rank, worker, *args):
    """Run a spawned rank's ``worker(rank, *args)``, then end the process as the
    ``instaquant`` command ends a torchrun rank (without the interpreter's teardown, which the
    process group DistributedDataParallel keeps alive can abort)."""
    worker(rank, *args)
    distributed.finish_process(0)


def as_rank(rank, world, port):
    """Set the environment torchrun would give process ``rank`` of ``world`` (one thread each:
    the ranks share this machine's cores)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def parameters(program: torch.export.ExportedProgram) -> list:
    """The input specs of an exported program's parameters."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    return [s for s in program.graph_signature.input_specs if s.kind == kind]


def unused_parameters(program: torch.export.ExportedProgram) -> list[str]:
    """Parameters that an exported program takes but never reads (dead weight in the file)."""
    unused = {n.name for n in program.graph.nodes if n.op == "placeholder" and not n.users}
    return [s.target for s in parameters(program) if s.arg.name in unused]
