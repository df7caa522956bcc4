"""Data parallelism over the processes of a launcher (``accelerate launch``, ``torchrun``).

A launcher starts one process per GPU (or per CPU process) and tells each its place in the
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (:func:`launcher`). A command that runs
data parallel (``importance``, ``activations``) joins a process group for its run
(:func:`launched`: NCCL on CUDA, gloo on the CPU), each rank loads its own replica of the model
(on ``cuda:LOCAL_RANK``) and reads the *whole* corpus, and :class:`DataParallel` says which
batches are this rank's:

* **round-robin**: global batch ``i`` is rank ``i % world_size``'s. Every rank tokenises the
  whole (lazy) stream, cheap next to a forward pass, so no rank needs the corpus' size before
  it starts (a hub stream or a token budget has none until read to the end), each prefix of
  the corpus is spread evenly over the ranks (cumulative snapshots are taken at the same
  global batch on every rank, with every rank busy up to it), and the batches themselves are
  exactly those of one process (so are per-batch criteria such as ``abs_sum``). Contiguous
  shares would need the batch count first (a second pass over the stream) and would put a
  snapshot's whole prefix on the first ranks.
* the ranks' sums are then added by ``all_reduce`` (:func:`all_reduce_`) and only rank 0
  writes; the others wait on a :func:`barrier`.

Data parallel here means replicas of plain tensors. Under FSDP2 (``fully_shard``) parameters are
DTensors holding each rank's rows, and every rank passes its own batches: see
:mod:`.sharding` and :mod:`lmeval_regions.importance.shards`. A model wrapped in
``DistributedDataParallel`` is refused: DDP averages each backward's gradients over the ranks,
which would mix ranks' batches inside per-batch criteria.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.sharding import is_sharded


def launcher() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` a launcher put in the environment; ``(0, 1, 0)``
    for a plain process."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise RegionsError(f"RANK/WORLD_SIZE/LOCAL_RANK in the environment are not whole "
                           f"numbers: {os.environ.get('RANK')!r}/{os.environ.get('WORLD_SIZE')!r}"
                           f"/{os.environ.get('LOCAL_RANK')!r}") from None


def launched_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher with several processes (one GPU per
    process); any other device, or a plain process, is unchanged."""
    _, world, local_rank = launcher()
    if world > 1 and device == "cuda":
        return f"cuda:{local_rank}"
    return device


@dataclass(frozen=True)
class DataParallel:
    """This process' place among the data-parallel ranks."""

    rank: int
    """This process' rank, 0 .. world_size - 1 (rank 0 writes the outputs)."""
    world_size: int
    """Number of ranks (> 1)."""

    @property
    def main(self) -> bool:
        """True on rank 0, the one that writes."""
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether global batch ``index`` (0-based, over the whole corpus) is this rank's:
        round-robin, ``index % world_size == rank``."""
        return index % self.world_size == self.rank


def data_parallel(model: nn.Module | None = None) -> DataParallel | None:
    """The data-parallel ranks this process is one of: a default process group of more than
    one process whose ``model`` (when given) holds plain tensors; None otherwise (one process,
    or FSDP2's DTensor shards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    if model is not None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise RegionsError("the model is wrapped in DistributedDataParallel, whose backward "
                               "averages gradients over the ranks (mixing their batches); pass "
                               "the unwrapped module (model.module): batches are dealt to the "
                               "ranks here and their sums added once")
        if any(is_sharded(p) for p in model.parameters()):
            return None  # FSDP2: each rank holds its rows (importance.shards)
    return DataParallel(dist.get_rank(), dist.get_world_size())


@contextlib.contextmanager
def launched(device: str, device_map: str | None = None) -> Iterator[DataParallel | None]:
    """Join the launcher's process group for the block (NCCL when ``device`` is CUDA, else gloo)
    and leave it afterwards; yields the ranks, or None for a plain process (nothing is done).

    A process group that already exists is used as it is (and left open)."""
    import torch.distributed as dist

    rank, world, local_rank = launcher()
    if world < 2:
        yield None
        return
    if device_map:
        raise RegionsError(f"--device-map {device_map} spreads one model over the GPUs, but "
                           f"this is one of {world} launched processes, each holding its own "
                           "replica: drop --device-map (data parallel), or run one process "
                           "with --device-map")
    if dist.is_initialized():
        yield data_parallel()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        yield DataParallel(rank, world)
    finally:
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` replaced in place by its sum (``op="sum"``), maximum or minimum over the ranks;
    returns ``t``. Every rank must call it, in the same order."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op])
    return t


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class BatchDigest:
    """A running digest of every batch a rank is given, to check that all ranks were given the
    same corpus (round-robin dealing needs it): :meth:`check` compares the ranks' digests."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=7)  # 56 bits: fits an int64 tensor
        self.batches = 0

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        ids = batch["input_ids"]
        self._h.update(str(tuple(ids.shape)).encode())
        self._h.update(ids.detach().cpu().contiguous().numpy().tobytes())
        self.batches += 1

    def check(self, device: torch.device, what: str = "batches") -> None:
        """Raise on every rank (never only on some) when the ranks' digests differ."""
        value = int.from_bytes(self._h.digest(), "little")
        t = torch.tensor([value, -value, self.batches, -self.batches], dtype=torch.int64,
                         device=device)
        all_reduce_(t, "max")
        if int(t[0]) != -int(t[1]) or int(t[2]) != -int(t[3]):
            raise RegionsError(f"the ranks were given different {what} ({-int(t[3])} to "
                               f"{int(t[2])} batches): data-parallel runs deal one corpus "
                               "round-robin, so every rank must be given the whole corpus, "
                               "the same on each")
