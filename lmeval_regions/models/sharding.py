"""FSDP2 / DTensor local-shard arithmetic, on public torch APIs (one place for all of it).

Regions, importance and the freeze adapter always refer to the *full* parameter. Under FSDP2
(``torch.distributed.fsdp.fully_shard``, also through accelerate) a parameter is a ``DTensor``
sharded on dim 0 (``Shard(0)``), split like ``torch.chunk``: on a mesh dimension of size ``w``,
rank ``r`` holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / w)`` (the last ranks may
hold fewer rows, or none). Replicated mesh dimensions (HSDP's outer one) hold everything.
Plain tensors are whole on every rank.

Used by :mod:`lmeval_regions.importance` (accumulate this rank's rows, write per-rank files)
and :mod:`lmeval_regions.training` (freeze the region entries this rank holds).
"""

from __future__ import annotations

import math

import torch

from lmeval_regions.errors import RegionsError


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 parameter or gradient)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor (shares storage): ``t.to_local()`` for a DTensor, else ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dim 0 of the full tensor that this rank holds.

    Plain tensors: all rows. DTensors: placements must be ``Shard(0)`` on one mesh dimension
    (FSDP2) and ``Replicate`` on any other (HSDP); anything else is refused.
    """
    n = p.shape[0] if p.dim() else 1
    if not is_sharded(p):
        return 0, n
    from torch.distributed.tensor import Replicate, Shard

    start, stop = 0, n
    sharded = False
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if not (isinstance(pl, Shard) and pl.dim == 0) or sharded:
            raise RegionsError(f"parameter sharded as {p.placements}; only Shard(0) on one mesh "
                               "dimension (FSDP2) with Replicate elsewhere is supported")
        sharded = True
        world = p.device_mesh.size(mesh_dim)
        rank = p.device_mesh.get_local_rank(mesh_dim)
        chunk = math.ceil(n / world)
        start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    held = p.to_local().shape[0] if p.dim() else 1
    if held != stop - start:
        raise RegionsError(f"local shard has {held} rows, expected {stop - start} (rows "
                           f"{start}:{stop} of {n}): not a torch.chunk-style Shard(0)")
    return start, stop


def local_flat_range(p: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)`` of the full tensor's flat indices that this rank holds."""
    start, stop = local_rows(p)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return start * row, stop * row


def local_indices(p: torch.Tensor, full_idx: torch.Tensor) -> torch.Tensor:
    """The entries of sorted full flat indices ``full_idx`` held here, as int64 flat indices
    into ``local(p)`` (shape ``(k_local,)``)."""
    start, stop = local_flat_range(p)
    idx = full_idx.long()
    if start == 0 and stop == p.numel():
        return idx
    lo, hi = torch.searchsorted(idx, torch.tensor([start, stop])).tolist()
    return idx[lo:hi] - start


def full_tensor(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a local buffer shaped like ``local(like)`` into the full tensor (a collective
    when ``like`` is sharded: every rank must call it)."""
    if not is_sharded(like):
        return buf
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(buf, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor shaped like ``like`` (inverse of :func:`full_tensor`)."""
    start, stop = local_flat_range(like)
    return full.reshape(-1)[start:stop].view(local(like).shape)


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
