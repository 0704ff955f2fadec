"""Multi-process training under torchrun: the process group, reductions, rank-0 duties.

A single process (no ``WORLD_SIZE`` in the environment) gets a context whose
reductions are identities, so the trainer has one code path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Reduce ``t`` over ranks in place (and return it); identity in one process."""
        if self.enabled:
            red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
            dist.all_reduce(t, op=red[op])
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (on the CPU), in rank order; ``[t]`` in one process."""
        if not self.enabled:
            return [t.cpu()]
        t = t.to(self.device)
        found = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(found, t)
        return [f.cpu() for f in found]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BN running statistics, LQ-Nets bases) everywhere.

        DDP broadcasts them at the start of each forward, so after the last step
        every rank still holds its own update; this makes evaluation and the final
        state identical across ranks.
        """
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_name: str) -> DistContext:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = _world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available()
    )
    if use_cuda and world > 1 and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"process {local_rank} of this node needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} GPU(s) are visible: start one process per GPU "
            "(torchrun --nproc_per_node), or set device=cpu to train on gloo"
        )
    if use_cuda:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _world_size() -> int:
    """The process count torchrun announces (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    """Whether this process is one of several started by torchrun."""
    return _world_size() > 1


def finish_process(code: int) -> NoReturn:
    """End a process that trained under DistributedDataParallel, skipping the interpreter's
    teardown once its output is flushed.

    DistributedDataParallel keeps the gloo process group, and its worker threads, alive past
    ``destroy_process_group`` (PyTorch 2.x); tearing the interpreter down around those threads
    occasionally aborts a rank with SIGABRT after a run that succeeded, which torchrun reports
    as a failure. Everything the run writes is already on disk (written atomically). The
    ``instaquant`` command ends its ranks this way; a script of one's own that trains under
    torchrun can end with ``finish_process(0)``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
