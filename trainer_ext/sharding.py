"""Map full-tensor flat indices onto the local shard of a parameter (DDP, FSDP2, plain).

Regions and importance artefacts always refer to the *full* parameter. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) each parameter is a ``DTensor`` sharded on dim 0
(``Shard(0)``): rank r holds rows ``[offset, offset + local_rows)`` of the full tensor, so the
full flat indices ``[offset * row_numel, (offset + local_rows) * row_numel)`` are local, shifted by
``offset * row_numel``. Plain tensors and replicated DTensors hold everything.
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
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor (shares storage): ``t.to_local()`` for a DTensor, else ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_flat_range(p: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)`` of the full tensor's flat indices that this rank holds.

    Raises :class:`RegionsError` for shardings other than ``Shard(0)`` / ``Replicate``.
    """
    if not is_sharded(p):
        return 0, p.numel()
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise RegionsError(f"parameter sharded as {p.placements}; only Shard(0) (FSDP2) and "
                               "Replicate are supported")
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    start = int(offset[0]) * row if p.dim() else 0
    return start, start + math.prod(local_shape)


def local_indices(p: torch.Tensor, full_idx: torch.Tensor) -> torch.Tensor:
    """The entries of sorted full flat indices ``full_idx`` held locally, as int64 flat indices
    into ``local(p)`` (shape (k_local,))."""
    start, stop = local_flat_range(p)
    idx = full_idx.long()
    if start == 0 and stop == p.numel():
        return idx
    lo, hi = torch.searchsorted(idx, torch.tensor([start, stop])).tolist()
    return idx[lo:hi] - start


def full_tensor(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a local buffer shaped like ``local(like)`` into the full tensor (a collective for
    sharded ``like``: every rank must call it)."""
    if not is_sharded(like):
        return buf
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(buf, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor shaped like ``like`` (inverse of :func:`full_tensor`)."""
    start, stop = local_flat_range(like)
    return full.reshape(-1)[start:stop].view(local(like).shape)
