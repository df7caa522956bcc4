"""Rank-window selection over many tensors in bounded memory (global and per-matrix scopes).

Entries are ranked by score (descending for ``top``, ascending otherwise), ties broken by
position: parameter order in ``names``, then flat index. A window of ``k`` consecutive ranks is
selected by a radix select on order-preserving int32 keys of the fp32 values:

1. a histogram of the keys' high 16 bits gives the buckets holding the window's first and last
   ranks;
2. a histogram of the low 16 bits of the entries in those two buckets gives the exact keys at
   both ends of the window and how many entries rank before each (skipped when no key has low
   bits, e.g. bf16 scores, whose fp32 patterns end in 16 zero bits);
3. an exact pass takes the entries strictly between the two end keys, and the entries equal to
   an end key in position order, counted as they stream by.

Memory: two 65,536-bin histograms, the temporaries of one chunk of :data:`CHUNK` entries, and the
selected indices (int32 where the parameter has < 2**31 entries) -- never a sort of the whole set
nor a list of boundary candidates. Time: 2 or 3 reads of each tensor (``scores`` may be lazy,
e.g. :class:`~lmeval_regions.artefacts.LazyScores`).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Mapping

import numpy as np
import torch

from lmeval_regions.errors import RegionsError
from lmeval_regions.regions.region import index_dtype

METHODS = ("top", "bottom", "middle", "random")

CHUNK = 1 << 22
"""Entries processed at once: bounds the temporaries to a few tens of MB per pass."""
_RANDOM_PERM_LIMIT = 1 << 26
"""Up to this many entries, global ``random`` draws one permutation of all of them."""
_NBINS = 1 << 16


def _keys(chunk: torch.Tensor, descending: bool, narrow: bool) -> torch.Tensor:
    """Order-preserving integer keys of a 1-D chunk: int16 of bf16 values when ``narrow``
    (the bf16 bit pattern is the top half of the fp32 one), else int32 of fp32 values.

    A float's bit pattern read as a signed integer is monotone for non-negative values;
    flipping the magnitude bits of negative ones makes it monotone everywhere, and adding 1 to
    negative keys folds ``-0.0`` onto ``+0.0`` (sorts treat them as equal). NaN ranks above
    +inf, as in ``torch.sort``. ``descending`` maps key to ``~key`` (ascending key order is then
    descending value order).
    """
    if narrow:
        b, top = chunk.view(torch.int16), 15
    else:
        b, top = (chunk if chunk.dtype == torch.float32 else chunk.float()).view(torch.int32), 31
    s = b >> top  # -1 for negative values, 0 otherwise
    key = (b ^ (s & ((1 << top) - 1))) - s
    return torch.bitwise_not(key) if descending else key


def _chunks(t: torch.Tensor):
    flat = t.detach().reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        yield s, flat[s:s + CHUNK]


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding ascending rank ``rank``, number of entries in lower bins)."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype), right=True))
    return b, int(cum[b - 1]) if b > 0 else 0


def _dtype_of(get, name, dtypes):
    return dtypes[name] if dtypes is not None else get(name).dtype


def select_window(
    get: Callable[[str], torch.Tensor], names: list[str], sizes: Mapping[str, int],
    lo: int, k: int, descending: bool, dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices (sorted; int32 where possible) of ranks ``[lo, lo + k)`` over ``names``.

    ``get(name)`` returns that parameter's scores (any shape); it is called 2-3 times per name
    (once more to learn its dtype unless ``dtypes`` says it).
    Parameters with no selected entry are absent from the result.
    """
    hi = lo + k
    # bf16 scores (e.g. read from a 16-bit artefact) are ranked on their 16-bit patterns: one
    # histogram gives exact keys; anything else goes through fp32 patterns, 16 bits a pass.
    narrow = all(_dtype_of(get, n, dtypes) == torch.bfloat16 for n in names)
    # pass 1: high 16 bits (all of them when narrow)
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    low_bits = False
    for n in names:
        for _, c in _chunks(get(n)):
            key = _keys(c, descending, narrow)
            high = key.to(torch.int32) if narrow else key >> 16
            hist += torch.bincount(high + (_NBINS // 2), minlength=_NBINS)
            low_bits = low_bits or (not narrow and bool((key & 0xFFFF).any()))
    ends = [_locate(hist, lo), _locate(hist, hi - 1)]  # (high bin, entries before it)
    if low_bits:
        # pass 2: low 16 bits of the entries in the two end bins
        bins = sorted({ends[0][0], ends[1][0]})
        low = {b: torch.zeros(_NBINS, dtype=torch.int64) for b in bins}
        for n in names:
            for _, c in _chunks(get(n)):
                key = _keys(c, descending, narrow)
                hb = (key >> 16) + (_NBINS // 2)
                for b in bins:
                    low[b] += torch.bincount(key[hb == b] & 0xFFFF, minlength=_NBINS)
        exact = []
        for (b, before), rank in zip(ends, (lo, hi - 1)):
            l, before_low = _locate(low[b], rank - before)
            exact.append((((b - _NBINS // 2) << 16) | l, before + before_low))
    else:
        shift = 0 if narrow else 16
        exact = [((b - _NBINS // 2) << shift, before) for b, before in ends]
    (key_lo, before_lo), (key_hi, before_hi) = exact
    # Ties at an end key are taken by position: ranks [first, last) among the tied entries.
    if key_lo == key_hi:
        tie_windows = {key_lo: (lo - before_lo, hi - before_lo)}
    elif lo == before_lo:  # every entry at key_lo is in: a plain range test covers them
        tie_windows = {key_hi: (0, hi - before_hi)}
    else:
        tie_windows = {key_lo: (lo - before_lo, math.inf), key_hi: (0, hi - before_hi)}
    take_lo = key_lo not in tie_windows
    seen = dict.fromkeys(tie_windows, 0)
    # pass 3: exact
    out: dict[str, torch.Tensor] = {}
    for n in names:
        parts = []
        dt = index_dtype(sizes[n])
        for s, c in _chunks(get(n)):
            key = _keys(c, descending, narrow)
            if take_lo:
                sel = key < key_hi if lo == 0 else (key >= key_lo) & (key < key_hi)
            else:
                sel = (key > key_lo) & (key < key_hi)
            for kv, (first, last) in tie_windows.items():
                eq = key == kv
                n_eq = int(eq.sum())
                if n_eq == 0:
                    continue
                if seen[kv] < last and seen[kv] + n_eq > first:
                    r = torch.cumsum(eq, 0) - 1 + seen[kv]  # rank among tied entries
                    sel |= eq & (r >= first) & (r < last)
                seen[kv] += n_eq
            idx = torch.nonzero(sel).reshape(-1)
            if idx.numel():
                parts.append((idx + s).to(dt))
        if parts:
            out[n] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def window(method: str, n: int, k: int) -> tuple[int, bool]:
    """``(lo, descending)``: the rank window ``[lo, lo + k)`` of ``method`` over ``n`` entries."""
    if method == "top":
        return 0, True
    if method == "bottom":
        return 0, False
    if method == "middle":
        return (n - k) // 2, False  # skip the (n - k) // 2 smallest
    raise RegionsError(f"selection method '{method}' is not known")


def _shapes_of(scores: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, list[int]]:
    # A lazy mapping may know its shapes without reading a tensor (LazyScores.shapes).
    known = getattr(scores, "shapes", None)
    if isinstance(known, Mapping):
        return {n: list(known[n]) for n in names}
    return {n: list(scores[n].shape) for n in names}


def _random_global(sizes: dict[str, int], names: list[str], k: int, seed: int):
    """k entries uniformly without replacement over all of ``names``.

    Small sets: one permutation of everything. Large sets (above ``_RANDOM_PERM_LIMIT``): the
    count per parameter is drawn from the multivariate hypergeometric law (exactly the law of a
    uniform k-subset), then each parameter's entries uniformly within it -- memory O(k).
    """
    total = sum(sizes.values())
    out = {}
    if total <= _RANDOM_PERM_LIMIT:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"global"))
        picks = torch.sort(torch.randperm(total, generator=g)[:k]).values
        start = 0
        for n in names:
            sel = picks[(picks >= start) & (picks < start + sizes[n])] - start
            if sel.numel():
                out[n] = sel.to(index_dtype(sizes[n]))
            start += sizes[n]
        return out
    rng = np.random.default_rng([seed, zlib.crc32(b"global")])
    counts = rng.multivariate_hypergeometric([sizes[n] for n in names], k, method="marginals")
    for n, m in zip(names, counts):
        if m:
            sel = np.sort(rng.choice(sizes[n], size=int(m), replace=False))
            out[n] = torch.from_numpy(sel).to(index_dtype(sizes[n]))
    return out


def select_global(scores: Mapping[str, torch.Tensor], names: list[str], method: str,
                  ratio: float, seed: int):
    """The ``ratio`` share of all entries of ``names`` by ``method``, ranked across parameters.

    Returns ``(indices, shapes)``: ``name -> sorted flat indices`` (parameters with none absent)
    and ``name -> shape`` for every name.
    """
    shapes = _shapes_of(scores, names)
    sizes = {n: math.prod(shapes[n]) for n in names}
    total = sum(sizes.values())
    k = n_select(total, ratio)
    if method == "random":
        return _random_global(sizes, names, k, seed), shapes
    lo, descending = window(method, total, k)
    dtypes = getattr(scores, "dtypes", None)  # a lazy mapping knows them without reading
    return select_window(scores.__getitem__, names, sizes, lo, k, descending,
                         dtypes if isinstance(dtypes, Mapping) else None), shapes


def n_select(n: int, ratio: float) -> int:
    """How many of ``n`` entries a ratio selects: ``floor(ratio * n)``, at least 1.

    The floor is paper 1's release (``torch.topk`` with ``k = int(ratio * n)``), computed in
    the same float arithmetic, so e.g. ``0.29 * 100 = 28.999...`` selects 28 there and here.
    A unit with ``ratio * n < 1`` (a small matrix, a row) still gets one entry: the release
    would select none there, which would leave the unit out of every region.
    """
    return max(1, min(n, math.floor(ratio * n)))


def check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise RegionsError(f"ratio {ratio!r} is not a number; expected a value in (0, 1]") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise RegionsError(f"ratio {ratio!r} is outside (0, 1]; e.g. 0.01 selects 1%")
    return r


def seed_for(seed: int, name: str) -> int:
    """A seed per parameter (by name), so a region does not depend on parameter order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


SORT_LIMIT = 1 << 20
"""Up to this many entries per-matrix/row selection sorts; above, it radix-selects."""


def select_flat(x: torch.Tensor, k: int, method: str, gen_seed: int) -> torch.Tensor:
    """Flat indices of ``k`` entries of the 1-D tensor ``x`` by ``method`` (sorted).

    Ties are broken by position (lower flat index first), so the result is deterministic.
    """
    n = x.numel()
    if method == "random":
        g = torch.Generator().manual_seed(gen_seed)
        return torch.sort(torch.randperm(n, generator=g)[:k]).values
    if method not in METHODS:
        raise RegionsError(f"selection method '{method}' is not one of {METHODS}")
    lo, descending = window(method, n, k)
    if n <= SORT_LIMIT:  # small (rows, small matrices): one stable sort is fastest
        order = torch.sort(x, descending=descending, stable=True).indices[lo:lo + k]
        return torch.sort(order).values
    # Large: radix select in chunks, the same ranks as a stable sort in bounded memory
    # (a 45M-entry matrix at 7B scale would need ~1 GB to sort).
    return select_window(lambda _: x, ["x"], {"x": n}, lo, k, descending, {"x": x.dtype})["x"]
