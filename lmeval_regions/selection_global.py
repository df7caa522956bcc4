"""Global selection: the k entries of a whole model by score, reading one tensor at a time.

Two passes over ``scores`` (a mapping that may be lazy, e.g. memory-mapped safetensors):
1. a histogram of the scores' fp32 bit patterns (for non-negative floats the order of the bit
   patterns is the order of the values), giving the bucket that holds the k-th value;
2. an exact pass keeping entries strictly beyond that bucket plus, from the boundary bucket,
   the candidates needed, resolved exactly with ties broken by (parameter order, flat index).
Memory: one tensor at a time plus the boundary bucket's candidates.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping

import torch

from .errors import RegionsError

_BUCKET_SHIFT = 16  # 65536 buckets over the top 16 bits of the fp32 pattern


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of fp32 values (handles negatives too)."""
    b = x.float().reshape(-1).view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF) - 1, b)  # monotone in the float value


def select_global(scores: Mapping[str, torch.Tensor], names: list[str], method: str,
                  ratio: float, seed: int):
    from .regions import index_dtype, n_select

    sizes = {n: scores[n].numel() for n in names}
    total = sum(sizes.values())
    k = n_select(total, ratio)
    shapes = {n: list(scores[n].shape) for n in names}
    if method == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"global"))
        picks = torch.sort(torch.randperm(total, generator=g)[:k]).values
        out, start = {}, 0
        for n in names:
            sel = picks[(picks >= start) & (picks < start + sizes[n])] - start
            if sel.numel():
                out[n] = sel.to(index_dtype(sizes[n]))
            start += sizes[n]
        return out, shapes
    if method == "middle":
        lo = (total - k) // 2  # skip the lo smallest, then take k
    elif method == "bottom":
        lo = 0
    elif method == "top":
        lo = total - k
    else:
        raise RegionsError(f"selection method '{method}' is not known")
    # rank window [lo, lo + k) in ascending order; ties: earlier (parameter, index) ranks lower
    # for bottom/middle. For top we want ties resolved towards earlier positions as well, so
    # rank descending: convert to ascending ranks on negated keys.
    descending = method == "top"
    if descending:
        lo = 0

    def keys_of(n):
        kk = _keys(scores[n])
        return -kk if descending else kk

    # pass 1: histogram over the high bits of the keys
    offset = 1 << 31
    n_buckets = 1 << (32 - _BUCKET_SHIFT + 1)
    hist = torch.zeros(n_buckets, dtype=torch.int64)
    for n in names:
        b = (keys_of(n) + offset) >> _BUCKET_SHIFT
        hist += torch.bincount(b, minlength=n_buckets)
    cum = torch.cumsum(hist, 0)
    hi = lo + k  # exclusive rank bound
    b_lo = int(torch.searchsorted(cum, torch.tensor(lo), right=True))
    b_hi = int(torch.searchsorted(cum, torch.tensor(hi - 1), right=True))
    # pass 2: entries in buckets strictly inside (b_lo, b_hi) are in; boundary buckets resolved
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    cand_keys, cand_pos = [], []  # boundary candidates: (key, parameter order, flat index)
    for order, n in enumerate(names):
        kk = keys_of(n)
        b = (kk + offset) >> _BUCKET_SHIFT
        inside = (b > b_lo) & (b < b_hi)
        out[n].append(torch.nonzero(inside).reshape(-1))
        edge = torch.nonzero((b == b_lo) | (b == b_hi)).reshape(-1)
        cand_keys.append(kk[edge])
        cand_pos.append(torch.stack([torch.full_like(edge, order), edge], 1))
    below = int(cum[b_lo - 1]) if b_lo > 0 else 0  # entries ranked before the lower bucket
    ck = torch.cat(cand_keys)
    cp = torch.cat(cand_pos)
    # sort candidates by (key, parameter order, index): lexsort via stable sorts
    o = torch.sort(cp[:, 1], stable=True).indices
    o = o[torch.sort(cp[o, 0], stable=True).indices]
    o = o[torch.sort(ck[o], stable=True).indices]
    if b_lo == b_hi:
        take = o[lo - below: hi - below]
    else:
        n_lo_bucket = int(hist[b_lo])
        # the lower bucket's candidates come first in key order
        take = torch.cat([o[lo - below: n_lo_bucket], o[n_lo_bucket: n_lo_bucket + (hi - int(cum[b_hi - 1]))]])
    for j in take.tolist():
        order, idx = cp[j].tolist()
        out[names[order]].append(torch.tensor([idx]))
    result = {}
    for n in names:
        if out[n]:
            idx = torch.sort(torch.cat(out[n])).values
            if idx.numel():
                result[n] = idx.to(index_dtype(sizes[n]))
    return result, shapes
