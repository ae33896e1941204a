"""Thin helpers over torch.distributed for `pretrain` under torchrun.

Nothing here launches processes: torchrun does (one or many nodes), we only read
its environment, join the process group and move small things between ranks.
Without torchrun every helper degrades to the single-process answer, so the
training code has one path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", timeout_minutes: int = 180) -> Dist:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); (0, 1, 0) without torchrun.

    The timeout is long because rank 0 alone runs a few stages (the warm-up
    phases, the mixture fit) while the others wait at a barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """`init` for a stage's whole run: the process group it joined is left on the way
    out (also after an error), so a stage is one call under torchrun too."""
    joined = not dist.is_initialized()
    ctx = init(device)
    try:
        yield ctx
    finally:
        if ctx.enabled and joined and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, ctx: Dist | None = None) -> torch.device:
    """`auto` -> cuda when there is one, else cpu; under torchrun each rank takes its
    local GPU. A CUDA device without CUDA, or a name torch does not know, is a
    ValueError with one line."""
    ctx = ctx or Dist()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}, but no CUDA device is available")
        if parsed.index is None and ctx.enabled:
            parsed = torch.device(f"cuda:{ctx.local_rank}")
    return parsed


# ---- CPU threads and data workers: one policy for every command that computes ----------------

def cores_per_process() -> int:
    """This machine's cores shared by the processes torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers() -> int:
    """Data workers when not given: half the cores (decoding runs beside the model), none on one core."""
    return cores_per_process() // 2


def default_threads(workers: int) -> int:
    """torch threads when not given: $OMP_NUM_THREADS if set (several jobs sharing one
    machine), else one per core the data workers leave free: threads + workers never
    exceed the cores, which on a busy CPU costs 4-6x per step (docs/performance.md)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cores_per_process() - workers)


def use_threads(threads: int | None, workers: int) -> int:
    """Set torch's intra-op threads: `threads`, or with 0 `default_threads(workers)`; None
    leaves them as they are (a stage run inside another, as pretrain's warm-up). Returns
    the count in use."""
    if threads is None:
        return torch.get_num_threads()
    threads = threads or default_threads(workers)
    torch.set_num_threads(threads)
    return threads


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: Dist, obj: Any = None, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; for small things like a split's keys)."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_object(ctx: Dist, obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj`, as a list on rank `dst` (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def gather_features(features: torch.Tensor, ctx: Dist) -> tuple[torch.Tensor, int]:
    """All ranks' features, concatenated in rank order, with the gradient flowing into
    this rank's own slice (open_clip's `gather_features` without `gather_with_grad`):
    every rank computes the same global loss, and DDP's gradient all-reduce combines
    the per-rank slices (averaged, as in open_clip). Returns (features, offset of this
    rank's rows). Ranks may hold different batch sizes (a stream's last batch):
    sizes are exchanged first and the rows padded for the collective."""
    if not ctx.enabled:
        return features, 0
    size = torch.tensor([len(features)], dtype=torch.long, device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = features.new_zeros((max(sizes), *features.shape[1:]))
    padded[: len(features)] = features.detach()
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[ctx.rank] = features
    return torch.cat(parts), sum(sizes[: ctx.rank])
