"""Multi-process training under ``torchrun``: process group, ranks, and the few collectives
the trainer needs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``
(or a rendezvous endpoint); :func:`setup` reads them and joins the group with NCCL on CUDA
and gloo on the CPU. Without them (a plain ``mrivq train``) everything here is a no-op and
the trainer runs as a single process, rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mrivq.errors import ConfigError, UserError


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> Context:
    """Join the process group when launched with several processes; else a single-process context.

    ``device`` is the configured device; on CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                              "devices here; use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: Context):
    """Rank 0 runs the block first (e.g. generating the phantom or filling the slice cache),
    then the others, which find its results on disk. If rank 0 fails, it raises its error
    and the others a short one, instead of waiting for it forever."""
    if not ctx.active:
        yield
        return
    if ctx.is_main:
        try:
            yield
        except BaseException:
            barrier(ctx)
            any_rank(ctx, True)
            raise
        barrier(ctx)
        any_rank(ctx, False)
        return
    barrier(ctx)
    if any_rank(ctx, False):
        raise UserError(f"rank {ctx.rank}: rank 0 could not prepare the data; see its error above")
    yield


def any_rank(ctx: Context, flag: torch.Tensor | bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a host value: one sync)."""
    value = torch.as_tensor(flag, dtype=torch.int32, device=ctx.device).reshape(1)
    if ctx.active:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_true(finite: torch.Tensor) -> torch.Tensor:
    """``finite`` (a bool scalar tensor) AND-ed over all ranks, when a group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return finite
    value = finite.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool().reshape(())


def sum_(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place when a group is running)."""
    if ctx.active:
        dist.all_reduce(tensor)
    return tensor


def gather(ctx: Context, obj) -> list:
    """Every rank's ``obj``, in rank order (picklable objects, CPU tensors)."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(order, ctx: Context):
    """This rank's part of an epoch's permutation ``order``, as DistributedSampler does it:
    pad by wrapping to a multiple of the world size, then take every ``world_size``-th index
    from ``rank``. Batch ``b`` of every rank together is batch ``b`` of one process with a
    ``world_size`` times larger batch on the padded order."""
    if not ctx.active:
        return order
    n = len(order)
    total = -(-n // ctx.world_size) * ctx.world_size
    padded = np.resize(order, total)  # wraps around as often as needed
    return padded[ctx.rank::ctx.world_size]
