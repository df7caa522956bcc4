"""Rank-window selection over many tensors in bounded memory (global and per-matrix scopes).

Entries are ranked by score (descending for ``top``, ascending otherwise), ties broken by
position: parameter order in ``names``, then flat index -- exactly the order of a stable sort of
all entries. A window of ``k`` consecutive ranks is selected by a radix select on
order-preserving integer keys of the values (int16 bf16 patterns, int32 fp32 patterns):

1. a histogram of the keys' high 16 bits (all 16 bits of bf16 keys) gives the buckets holding
   the window's first and last ranks;
2. fp32 keys only: a histogram of the low 16 bits of the entries in those two buckets gives the
   exact keys at both ends of the window (skipped when no key has low bits, e.g. bf16 scores
   stored as fp32);
3. a selection pass takes the entries between the two end keys and, of the entries equal to an
   end key, those whose rank among them (by position) falls in the window.

Non-negative scores without NaN (importance scores) are ranked on their raw bit patterns
(no key transform); chunks holding negatives, ``-0.0`` or NaN are mapped to the same key space.

Memory: two 65,536-bin histograms, the temporaries of one chunk of :data:`CHUNK` entries per
worker, the tensors being read by the workers, and the selected indices (int32 where the
parameter has < 2**31 entries). Time: 2 (bf16) or 3 reads of each tensor for the global scope;
one read per matrix for the per-matrix scope (:func:`select_matrices`), whose matrices are
ranked by :func:`workers` threads at once (reading one while ranking another).
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import numpy as np
import torch

from lmeval_regions import kernels
from lmeval_regions.errors import RegionsError
from lmeval_regions.regions.region import index_dtype

METHODS = ("top", "bottom", "middle", "random")

CHUNK = 1 << 22
"""Entries processed at once: bounds the temporaries to a few tens of MB per worker."""
WORKERS: int | None = None
"""Threads ranking at once; None: ``torch.get_num_threads()`` (all cores by default)."""
_RANDOM_PERM_LIMIT = 1 << 26
"""Up to this many entries, global ``random`` draws one permutation of all of them."""
_HYPERGEOMETRIC_LIMIT = 10**9  # numpy's multivariate_hypergeometric("marginals") limit
_NBINS = 1 << 16
_HALF = _NBINS // 2
_INF16, _INF32 = kernels.INF16, kernels.INF32  # +inf as a bf16 / fp32 pattern
_NAN16, _NAN32 = 0x7FFF, 0x7FFFFFFF  # the key every NaN gets

T = TypeVar("T")
R = TypeVar("R")


def workers() -> int:
    """How many threads rank at once (:data:`WORKERS`, else torch's intra-op thread count)."""
    return max(1, WORKERS if WORKERS is not None else torch.get_num_threads())


@contextmanager
def _one_thread_per_op(n_workers: int):
    # Each worker runs its ops on one thread: the ops are memory-bound, and OpenMP hand-offs
    # (W workers x W threads, spin-waiting on a busy machine) cost more than they give --
    # measured 2.4x the CPU time for one worker on two OpenMP threads.
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pmap(fn: Callable[[T], R], items: Iterable[T], n_workers: int) -> Iterator[R]:
    """``map(fn, items)`` in order, ``n_workers`` items in flight (one at a time when 1)."""
    if n_workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(n_workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= n_workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


# ---------------------------------------------------------------------------------- keys

def _keys(chunk: torch.Tensor, narrow: bool) -> tuple[torch.Tensor, bool]:
    """``(keys, non_negative)``: order-preserving integer keys of a 1-D chunk, int16 of bf16
    values when ``narrow`` (the bf16 bit pattern is the top half of the fp32 one), else int32
    of fp32 values; ``non_negative`` when every key is >= 0.

    A float's bit pattern read as a signed integer is monotone for non-negative values (the
    common case: the keys are the chunk itself, no copy); flipping the magnitude bits of
    negative ones makes it monotone everywhere, and adding 1 to negative keys folds ``-0.0``
    onto ``+0.0`` (sorts treat them as equal). Every NaN gets the largest key, above +inf, as
    in ``torch.sort`` (where NaNs tie, broken by position).
    """
    if narrow:
        b, top, inf, nan_key = chunk.view(torch.int16), 15, _INF16, _NAN16
    else:
        f = chunk if chunk.dtype == torch.float32 else chunk.float()
        b, top, inf, nan_key = f.view(torch.int32), 31, _INF32, _NAN32
    if b.numel() == 0:
        return b, True
    lo, hi = torch.aminmax(b)
    if int(lo) >= 0 and int(hi) <= inf:
        return b, True
    s = b >> top  # -1 for negative values, 0 otherwise
    key = (b ^ (s & ((1 << top) - 1))) - s
    nan = torch.isnan(chunk)  # (a negative NaN's pattern lies among the negative numbers')
    if bool(nan.any()):
        key = key.masked_fill(nan, nan_key)
    return key, int(key.min()) >= 0


def _chunks(t: torch.Tensor, start: int = 0, stop: int | None = None):
    flat = t.detach().reshape(-1)
    stop = flat.numel() if stop is None else stop
    for s in range(start, stop, CHUNK):
        yield s, flat[s:min(s + CHUNK, stop)]


def _bincount(values: torch.Tensor, non_negative: bool) -> torch.Tensor:
    """65,536-bin histogram of int16-range ``values`` (bin = value + 32768)."""
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    if values.numel() == 0:
        return hist
    if non_negative:  # straight from the (int16/int32) values: no offset copy
        h = torch.bincount(values)
        hist[_HALF:_HALF + h.numel()] += h
    else:
        hist += torch.bincount(values.to(torch.int32) + _HALF, minlength=_NBINS)
    return hist


def _high(key: torch.Tensor, narrow: bool) -> torch.Tensor:
    return key if narrow else key >> 16


# ---------------------------------------------------------------------------------- passes

def _hist_pass(x: torch.Tensor, narrow: bool, start: int = 0, stop: int | None = None):
    """Pass 1 over entries ``[start, stop)`` of ``x``: (high-bits histogram, any low bits)."""
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    low_bits = False
    for _, c in _chunks(x, start, stop):
        key, nonneg = _keys(c, narrow)
        hist += _bincount(_high(key, narrow), nonneg)
        if not narrow and not low_bits:  # one test usually settles it
            low_bits = bool((key & 0xFFFF).any())
    return hist, low_bits


def _low_pass(x: torch.Tensor, bins: list[int], start: int = 0, stop: int | None = None):
    """Pass 2 (fp32 keys): low-16-bit histograms of the entries in each of ``bins``."""
    low = {b: torch.zeros(_NBINS, dtype=torch.int64) for b in bins}
    for _, c in _chunks(x, start, stop):
        key, _ = _keys(c, False)
        high = (key >> 16) + _HALF
        for b in bins:
            low[b] += torch.bincount(key[high == b] & 0xFFFF, minlength=_NBINS)
    return low


def _in_band(keys: np.ndarray, lo_key: int | None, hi_key: int | None) -> np.ndarray:
    """Positions of ``lo_key <= keys <= hi_key`` (None: unbounded), ascending. numpy's
    comparison and nonzero run at 3x torch's on one thread here."""
    if lo_key is None and hi_key is None:
        return np.arange(keys.size)
    if lo_key is None:
        return np.flatnonzero(keys <= hi_key)
    if hi_key is None:
        return np.flatnonzero(keys >= lo_key)
    return np.flatnonzero((keys >= lo_key) & (keys <= hi_key))


def _candidates(x: torch.Tensor, lo_key: int | None, hi_key: int | None, narrow: bool,
                start: int = 0, stop: int | None = None):
    """Pass 3 over ``[start, stop)``: positions (from ``start``) and keys of the entries with
    ``lo_key <= key <= hi_key`` (None: unbounded), in position order."""
    idx_parts, key_parts = [], []
    for s, c in _chunks(x, start, stop):
        key, _ = _keys(c, narrow)
        kn = key.numpy()
        idx = _in_band(kn, lo_key, hi_key)
        if idx.size:
            idx_parts.append(idx + (s - start))
            key_parts.append(kn[idx])
    if not idx_parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32)
    return np.concatenate(idx_parts), np.concatenate(key_parts)


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding rank ``rank`` counted from bin 0, number of entries in lower bins)."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype), right=True))
    return b, int(cum[b - 1]) if b > 0 else 0


def _end_keys(hist: torch.Tensor, low: Mapping[int, torch.Tensor] | None, lo: int, hi: int,
              descending: bool, shift: int):
    """``[(key, entries ranked before it)]`` at ranks ``lo`` and ``hi - 1``.

    Histograms are in ascending key order; ``descending`` reads them from the top bin down.
    ``low`` is None (the bins are the keys, shifted left by ``shift``: fp32 keys without low
    bits) or the low-16-bit histograms of the end bins (fp32 keys, see :func:`_end_bins`).
    """
    def oriented(h):
        return h.flip(0) if descending else h

    def unorient(b):
        return _NBINS - 1 - b if descending else b

    out = []
    for rank in (lo, hi - 1):
        ob, before = _locate(oriented(hist), rank)
        b = unorient(ob)
        if low is None:
            out.append(((b - _HALF) << shift, before))
        else:
            ol, before_low = _locate(oriented(low[b]), rank - before)
            out.append((((b - _HALF) << 16) | unorient(ol), before + before_low))
    return out


def _end_bins(hist: torch.Tensor, lo: int, hi: int, descending: bool) -> list[int]:
    """The high-bits bins holding ranks ``lo`` and ``hi - 1``."""
    h = hist.flip(0) if descending else hist
    bins = {_locate(h, r)[0] for r in (lo, hi - 1)}
    return sorted(_NBINS - 1 - b if descending else b for b in bins)


class _Window:
    """Which candidates of the selection pass are in the rank window ``[lo, hi)``, given the
    keys at both ends: every key strictly between them, and of the entries tied at an end key,
    those whose rank among the tied ones (position order) is in the window."""

    def __init__(self, ends, lo: int, hi: int, descending: bool, counts: Mapping[int, int],
                 total: int):
        (k_first, before_first), (k_last, before_last) = ends
        self.lo_key, self.hi_key = min(k_first, k_last), max(k_first, k_last)
        if k_first == k_last:
            ties = {k_first: (lo - before_first, hi - before_first)}
        else:
            ties = {k_first: (lo - before_first, math.inf), k_last: (0, hi - before_last)}
        # an end key whose tied entries are all in needs no counting
        self.ties = {k: w for k, w in ties.items() if not (w[0] <= 0 and w[1] >= counts[k])}
        self.seen = dict.fromkeys(self.ties, 0)
        # Entries ranked before the first end key / after the last one: when there are none,
        # the selection pass needs no comparison on that side (e.g. top: nothing is above).
        beyond_first = before_first > 0
        beyond_last = total - before_last - counts[k_last] > 0
        need_lo, need_hi = (beyond_last, beyond_first) if descending else (beyond_first,
                                                                           beyond_last)
        self.bounds = (self.lo_key if need_lo else None, self.hi_key if need_hi else None)

    def take_all(self, parts: list[tuple[np.ndarray, np.ndarray]], n_workers: int = 1
                 ) -> list[np.ndarray]:
        """The candidates of every part ``(positions, keys)`` that are in the window; parts in
        position order (each consumed whole, later calls continue the count of ties), handled
        by ``n_workers`` threads: the entries tied at each end key are counted per part first,
        which fixes which of each part's ties are in; then one compiled pass per part
        (:func:`kernels.keep_window`) compacts its positions in place -- the results are
        views of the parts' position arrays."""
        ends = list(self.ties)

        def tied(part):  # how many entries of the part are at each end key
            return [int(np.count_nonzero(part[1] == kv)) for kv in ends]

        specs = []  # per part: (end key, the slice of its tied entries that is in)
        for counts in _pmap(tied, parts, n_workers):
            spec = []
            for kv, count in zip(ends, counts):
                (first, last), seen = self.ties[kv], self.seen[kv]
                spec.append((kv, max(0, first - seen), max(0, min(count, last - seen))))
                self.seen[kv] = seen + count
            specs.append(spec)

        def select(job):
            (idx, keys), spec = job
            return kernels.keep_window(idx, keys, self.lo_key, self.hi_key, spec)

        return list(_pmap(select, zip(parts, specs), n_workers))

    def take(self, idx: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The candidates (in position order, consumed in order) that are in the window (a
        view of ``idx``, compacted in place)."""
        return self.take_all([(idx, keys)])[0]


# ---------------------------------------------------------------------------------- windows

def _dtype_of(get, name, dtypes):
    return dtypes[name] if dtypes is not None else get(name).dtype


def select_window(
    get: Callable[[str], torch.Tensor], names: list[str], sizes: Mapping[str, int],
    lo: int, k: int, descending: bool, dtypes: Mapping[str, torch.dtype] | None = None,
    n_workers: int | None = None, split: bool = False,
) -> dict[str, torch.Tensor]:
    """Flat indices (sorted; int32 where possible) of ranks ``[lo, lo + k)`` over ``names``.

    ``get(name)`` returns that parameter's scores (any shape); it is called 2-3 times per name
    (once more to learn its dtype unless ``dtypes`` says it), from ``n_workers`` threads
    (default :func:`workers`) reading and ranking different parameters at once. ``split``:
    ``get`` returns tensors held in memory, so one parameter's entries may be shared between
    the threads in ranges of :data:`CHUNK` (a lazy ``get`` would read it once per range).
    Parameters with no selected entry are absent.
    """
    hi = lo + k
    n_workers = workers() if n_workers is None else max(1, n_workers)
    # bf16 scores (e.g. read from a 16-bit artefact) are ranked on their 16-bit patterns: one
    # histogram gives exact keys; anything else goes through fp32 patterns, 16 bits a pass.
    narrow = all(_dtype_of(get, n, dtypes) == torch.bfloat16 for n in names)
    if split and n_workers > 1:
        units = [(n, s, min(s + CHUNK, sizes[n])) for n in names
                 for s in range(0, sizes[n], CHUNK)]
    else:
        units = [(n, 0, sizes[n]) for n in names]
    n_workers = min(n_workers, len(units))

    with _one_thread_per_op(n_workers):
        # pass 1: high 16 bits (all of them when narrow)
        hist = torch.zeros(_NBINS, dtype=torch.int64)
        low_bits = False
        for h, lb in _pmap(lambda u: _hist_pass(get(u[0]), narrow, u[1], u[2]), units,
                           n_workers):
            hist += h
            low_bits |= lb
        low = None
        if low_bits:  # pass 2: low 16 bits of the entries in the two end bins
            bins = _end_bins(hist, lo, hi, descending)
            low = {b: torch.zeros(_NBINS, dtype=torch.int64) for b in bins}
            for part in _pmap(lambda u: _low_pass(get(u[0]), bins, u[1], u[2]), units,
                              n_workers):
                for b in bins:
                    low[b] += part[b]
        shift = 0 if narrow else 16
        ends = _end_keys(hist, low, lo, hi, descending, shift)
        if low is None:
            counts = {kv: int(hist[(kv >> shift) + _HALF]) for kv, _ in ends}
        else:
            counts = {kv: int(low[(kv >> 16) + _HALF][kv & 0xFFFF]) for kv, _ in ends}
        win = _Window(ends, lo, hi, descending, counts, sum(sizes[n] for n in names))
        lo_key, hi_key = win.bounds
        # pass 3: exact, in position order (ties at an end key are counted as they stream by)
        out: dict[str, list[torch.Tensor]] = {}
        results = _pmap(lambda u: _candidates(get(u[0]), lo_key, hi_key, narrow, u[1], u[2]),
                        units, n_workers)
        for (n, s, _), (idx, keys) in zip(units, results):
            sel = torch.from_numpy(win.take(idx, keys))
            if sel.numel():
                out.setdefault(n, []).append((sel + s).to(index_dtype(sizes[n])))
    return {n: torch.cat(p) if len(p) > 1 else p[0] for n, p in out.items()}


def window(method: str, n: int, k: int) -> tuple[int, bool]:
    """``(lo, descending)``: the rank window ``[lo, lo + k)`` of ``method`` over ``n`` entries."""
    if method == "top":
        return 0, True
    if method == "bottom":
        return 0, False
    if method == "middle":
        return (n - k) // 2, False  # skip the (n - k) // 2 smallest
    raise RegionsError(f"selection method '{method}' is not known")


def shapes_of(scores: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, list[int]]:
    """``name -> shape``; a lazy mapping may know its shapes without reading a tensor
    (:attr:`LazyScores.shapes`)."""
    known = getattr(scores, "shapes", None)
    if isinstance(known, Mapping):
        return {n: list(known[n]) for n in names}
    return {n: list(scores[n].shape) for n in names}


def dtypes_of(scores: Mapping[str, torch.Tensor]) -> Mapping[str, torch.dtype] | None:
    """``name -> dtype`` when a lazy mapping knows them without reading, else None."""
    dtypes = getattr(scores, "dtypes", None)
    return dtypes if isinstance(dtypes, Mapping) else None


def _random_global(sizes: dict[str, int], names: list[str], k: int, seed: int):
    """k entries uniformly without replacement over all of ``names``.

    Small sets: one permutation of everything. Large sets (above ``_RANDOM_PERM_LIMIT``): the
    count per parameter is drawn from the multivariate hypergeometric law (exactly the law of a
    uniform k-subset), then each parameter's entries uniformly within it -- memory O(k). Above
    numpy's limit for that law (1e9 entries in all): :func:`uniform_parts`, also O(k).
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
    if total >= _HYPERGEOMETRIC_LIMIT:
        # numpy's hypergeometric draws need fewer than 1e9 entries in all (a 7B model has
        # 6.5e9): uniform draws over the concatenation instead, made parameter by parameter
        for n, sel in zip(names, uniform_parts([sizes[n] for n in names], k, rng)):
            if sel.size:
                out[n] = torch.from_numpy(sel).to(index_dtype(sizes[n]))
        return out
    counts = rng.multivariate_hypergeometric([sizes[n] for n in names], k, method="marginals")
    for n, m in zip(names, counts):
        if m:
            sel = np.sort(rng.choice(sizes[n], size=int(m), replace=False))
            out[n] = torch.from_numpy(sel).to(index_dtype(sizes[n]))
    return out


def uniform_parts(sizes: list[int], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` distinct positions of the concatenation of parts of ``sizes`` entries, uniformly
    (a uniform k-subset), as sorted int64 positions within each part.

    The first ``k`` distinct values of a sequence of independent uniform draws over the
    concatenation, made part by part: how many of a round's draws land in each part is
    multinomial (shares ``size / total`` in float64), where in the part uniform; the repeats
    of a round (about k^2 / (2 total) at first) are drawn again. Memory: the selected
    positions, no array over all of them at once (at 7B scale 65 M positions: fresh memory
    costs up to seconds of page faults on a VM).
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise RegionsError(f"cannot draw {k} distinct entries of {total}")
    share = np.asarray(sizes, dtype=np.float64) / max(1, total)
    parts = [distinct(uniform_draws(n, int(c), rng)) for n, c in
             zip(sizes, rng.multinomial(k, share))]
    extra = [np.empty(0, dtype=np.int64) for _ in sizes]
    missing = k - sum(p.size for p in parts)
    while missing:  # (a round adds at most `missing` new values: never too many)
        for i, c in enumerate(rng.multinomial(missing, share)):
            if c:
                new, p = distinct(uniform_draws(sizes[i], int(c), rng)), parts[i]
                if p.size:
                    new = new[p[np.minimum(np.searchsorted(p, new), p.size - 1)] != new]
                extra[i] = distinct(np.concatenate([extra[i], new]))
        missing = k - sum(p.size + e.size for p, e in zip(parts, extra))
    return [distinct(np.concatenate([p, e])) if e.size else p for p, e in zip(parts, extra)]


def distinct(a: np.ndarray) -> np.ndarray:
    """The distinct values of the 1-D ``a``, sorted (``a`` is sorted in place). numpy 2.x's
    ``np.unique`` hashes integers first: 30x slower than a sort on 0.3 M int64 here."""
    a.sort()
    if a.size < 2:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


DRAW_CHUNK = 1 << 20
"""Draws made at once by :func:`uniform_draws` above :data:`FAST_BOUNDED` (8 MB of temporaries)."""
FAST_BOUNDED = 1 << 32
"""Up to this range numpy's bounded draws are fast (32-bit); above it they are rejected from a
power of two."""


def uniform_draws(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent uniform integers of ``[0, n)`` (int64), in draw order. Above 2^32
    (a 7B model's 6.5e9 entries) numpy's bounded draws cost ~70 ns each unless the range is
    a power of two (~2.5 ns, as below 2^32): there they are draws of ``[0, 2^b)`` (``2^b``
    the power of two at or above ``n``) with those ``>= n`` rejected, a chunk at a time."""
    if n <= FAST_BOUNDED:
        return rng.integers(0, n, size=size)
    span = 1 << (n - 1).bit_length()
    out = np.empty(size, dtype=np.int64)
    have = 0
    while have < size:
        want = min(size - have, DRAW_CHUNK)
        d = rng.integers(0, span, size=math.ceil(want * span / n * 1.001) + 64)
        d = d[d < n][:want]
        out[have:have + d.size] = d
        have += d.size
    return out


def select_global(scores: Mapping[str, torch.Tensor], names: list[str], method: str,
                  ratio: float, seed: int):
    """The ``ratio`` share of all entries of ``names`` by ``method``, ranked across parameters.

    Returns ``(indices, shapes)``: ``name -> sorted flat indices`` (parameters with none absent)
    and ``name -> shape`` for every name.
    """
    shapes = shapes_of(scores, names)
    sizes = {n: math.prod(shapes[n]) for n in names}
    total = sum(sizes.values())
    k = n_select(total, ratio)
    if method == "random":
        return _random_global(sizes, names, k, seed), shapes
    lo, descending = window(method, total, k)
    dtypes = dtypes_of(scores)
    got = _global_band(scores, names, sizes, lo, k, descending, dtypes)
    if got is None:
        got = select_window(scores.__getitem__, names, sizes, lo, k, descending, dtypes)
    return got, shapes


GLOBAL_SAMPLE = 1 << 20
"""Entries sampled (in blocks of every parameter) to bound a global rank window: at 7B scale
the band around a middle 1% window is ~2 % of the entries at this size, 3.5 % at 2^16."""
BAND_BYTES = 1_400_000_000
"""Memory the one-pass global selection may hold in band entries (4-byte position + key):
a 3 % window of LLaMA-2-7B's 6.48 B bf16 entries fits (with the 2 GB peak in view)."""


def _sample(scores: Mapping[str, torch.Tensor], names: list[str], sizes: Mapping[str, int],
            per_name: int) -> torch.Tensor:
    """Up to ``per_name`` entries of each parameter (scaled by its share of the entries), as
    raw bit patterns: evenly spaced blocks read from a lazy mapping (``read_range``: no pass
    over the file), or an even stride of a tensor in memory."""
    total = sum(sizes.values())
    read_range = getattr(scores, "read_range", None)
    parts = []
    for n in names:
        want = max(16, per_name * len(names) * sizes[n] // total)
        if callable(read_range):
            blocks, size = 16, max(1, want // 16)
            step = max(size, sizes[n] // blocks)
            pieces = [read_range(n, s, min(s + size, sizes[n]))
                      for s in range(0, sizes[n], step)][:blocks]
            x = torch.cat([p.reshape(-1) for p in pieces])
        else:
            x = scores[n].detach().reshape(-1)[::max(1, sizes[n] // want)]
        parts.append(_raw(x).clone())
    return torch.cat(parts)


def _raw(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32)


def _global_band(scores, names, sizes, lo, k, descending, dtypes) -> dict | None:
    """Global ranks ``[lo, lo + k)`` of non-negative, NaN-free bf16 or fp32 scores with one
    pass over the data: a sample (a few blocks of each parameter) bounds the window with a
    margin; one pass keeps the entries between the bounds (position and key, at most
    :data:`BAND_BYTES`) and counts those below; the window is then selected exactly within
    the band (histograms of its keys, ties by parameter order and position). None when the
    scores do not qualify or the band would not fit or misses the window (the caller then
    runs the exhaustive 2-3 passes)."""
    kinds = {(dtypes[n] if dtypes is not None else scores[n].dtype) for n in names}
    if kinds not in ({torch.bfloat16}, {torch.float32}):
        return None
    narrow = kinds == {torch.bfloat16}
    inf, total = (_INF16 if narrow else _INF32), sum(sizes.values())
    sample = torch.sort(_sample(scores, names, sizes, GLOBAL_SAMPLE // max(1, len(names)) + 64)
                        ).values
    if int(sample[0]) < 0 or int(sample[-1]) > inf:
        return None
    ns = sample.numel()
    a, b = (total - lo - k, total - lo) if descending else (lo, lo + k)

    def bound(rank: int, side: int) -> int | None:
        p = rank / total
        margin = 6 * math.sqrt(ns * p * (1 - p)) + 0.002 * ns + 8  # blocks: a wider margin
        i = math.floor(p * ns - margin) if side < 0 else math.ceil(p * ns + margin)
        return None if i < 0 or i >= ns else int(sample[i])

    lo_key, hi_key = bound(a, -1), bound(b, +1)
    sn = sample.numpy()
    est = (ns if hi_key is None else int(np.searchsorted(sn, hi_key, side="right"))) - (
        0 if lo_key is None else int(np.searchsorted(sn, lo_key)))
    key_bytes = 2 if narrow else 4
    if est / ns * total * (4 + key_bytes) > BAND_BYTES:
        return None

    read, checked = checking_reader(scores)

    def band_of(n: str):
        x = read(n).detach().reshape(-1)
        # one pass: band, keys, count below, and the values' check (the reader's is skipped)
        got = kernels.band_scan(_raw(x).numpy(), lo_key, hi_key)
        if checked is not None:
            checked(n, None if got is not None else x)
        return got

    n_workers = min(workers(), len(names))
    band: dict[str, tuple] = {}
    below = size = 0
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    with _one_thread_per_op(n_workers):
        for n, got in zip(names, _pmap(band_of, names, n_workers)):
            if got is None:
                return None
            idx, keys, b_n = got
            band[n] = (idx, keys)
            below += b_n
            size += idx.size
            kt = torch.from_numpy(keys)
            hist += _bincount(kt if narrow else kt >> 16, True)
    above = total - below - size
    if below > a or below + size < b:
        return None
    # the window within the band: ranks shifted by the entries ranked before the band
    blo = lo - (above if descending else below)
    low = None
    if not narrow:
        bins = _end_bins(hist, blo, blo + k, descending)
        low = {bb: torch.zeros(_NBINS, dtype=torch.int64) for bb in bins}
        for _, keys in band.values():
            kt = torch.from_numpy(keys)
            high = (kt >> 16) + _HALF
            for bb in bins:
                low[bb] += torch.bincount(kt[high == bb] & 0xFFFF, minlength=_NBINS)
    ends = _end_keys(hist, low, blo, blo + k, descending, 0 if narrow else 16)
    if low is None:
        counts = {kv: int(hist[(kv >> (0 if narrow else 16)) + _HALF]) for kv, _ in ends}
    else:
        counts = {kv: int(low[(kv >> 16) + _HALF][kv & 0xFFFF]) for kv, _ in ends}
    win = _Window(ends, blo, blo + k, descending, counts, size)
    out = {}
    with _one_thread_per_op(n_workers):  # (the band is wider than the window: narrowed here)
        picked = win.take_all([band.pop(n) for n in names], n_workers)
    for n, sel in zip(names, picked):
        if sel.size:
            out[n] = torch.from_numpy(sel).to(index_dtype(sizes[n]))
    return out


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


SORT_LIMIT = 1 << 15
"""Up to this many entries per-matrix/row selection sorts; above, it radix-selects (the same
ranks: a stable sort's)."""
_PREFIX_PERM_MIN = 1 << 16
"""From this many entries, ``random`` computes only the first k draws of torch's permutation."""


def _randperm_raw(seed: int, k: int) -> np.ndarray:
    """The first ``k`` 32-bit draws ``random()`` of a CPU generator seeded ``seed``: each
    ``random64()`` of a full-range int64 fill is two of them, high half first."""
    g = torch.Generator().manual_seed(seed)
    v = torch.empty((k + 1) // 2, dtype=torch.int64).random_(-2**63, None, generator=g).numpy()
    out = np.empty(2 * v.size, dtype=np.int64)
    out[0::2] = (v >> 32) & 0xFFFFFFFF
    out[1::2] = v & 0xFFFFFFFF
    return out[:k]


def randperm_prefix(n: int, k: int, seed: int) -> torch.Tensor:
    """``torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k])``,
    the same indices, in O(k log k) time and memory instead of O(n) random writes.

    torch's CPU ``randperm`` (n < 2^32 / 20) is a forward Fisher-Yates shuffle: step ``i`` swaps
    positions ``i`` and ``j_i = i + random() % (n - i)``, so its first k entries are final after
    k steps. Entry ``i`` is what position ``j_i`` held before step ``i``: the value moved there
    by the last earlier step with the same target, else ``j_i`` itself; a value moved by step
    ``t`` is what position ``t`` held before it, found by following earlier steps that targeted
    ``t`` (pointer doubling). Checked against ``torch.randperm`` at first use; falls back to it.
    """
    if not _prefix_matches_torch():
        g = torch.Generator().manual_seed(seed)
        return torch.sort(torch.randperm(n, generator=g)[:k]).values
    return torch.from_numpy(_prefix(n, k, seed))


def _prefix(n: int, k: int, seed: int) -> np.ndarray:
    t = np.arange(k, dtype=np.int64)
    j = t + _randperm_raw(seed, k) % (n - t)
    # steps by target, then step: one sort of j and t packed in one int64 (both < 2^28 as
    # n < 2^32 / 20), 3x faster than a stable argsort of j
    packed = np.sort((j << 28) | t)
    js, ts = packed >> 28, packed & ((1 << 28) - 1)
    same = js[1:] == js[:-1]
    last_same = np.full(k, -1, dtype=np.int64)  # last earlier step with step t's target
    last_same[ts[1:][same]] = ts[:-1][same]
    # last earlier step that targeted position p < k (moving a value into p before step p)
    into = (js < k) & (ts < js)
    next_into = np.zeros_like(into)
    next_into[:-1] = into[1:] & same
    last = into & ~next_into
    moved_in = np.full(k, -1, dtype=np.int64)
    moved_in[js[last]] = ts[last]
    held = np.where(moved_in >= 0, moved_in, t)  # position p held held[p] before step p
    while True:
        nxt = held[held]
        if np.array_equal(nxt, held):
            break
        held = nxt
    out = np.where(last_same >= 0, held[np.maximum(last_same, 0)], j)
    out.sort()
    return out


_PREFIX_OK: bool | None = None


def _prefix_matches_torch() -> bool:
    global _PREFIX_OK
    if _PREFIX_OK is None:
        ok = True
        for n, k, seed in ((1000, 300, 0), (4099, 4000, 1), (70000, 1200, 2)):
            g = torch.Generator().manual_seed(seed)
            want = torch.sort(torch.randperm(n, generator=g)[:k]).values.numpy()
            ok = ok and np.array_equal(_prefix(n, k, seed), want)
        _PREFIX_OK = ok
    return _PREFIX_OK


def select_flat(x: torch.Tensor, k: int, method: str, gen_seed: int,
                n_workers: int | None = None) -> torch.Tensor:
    """Flat indices of ``k`` entries of the 1-D tensor ``x`` by ``method`` (sorted; int64, or
    int32 from the one-pass band of a large tensor of fewer than 2^31 entries).

    Ties are broken by position (lower flat index first), so the result is deterministic.
    ``random`` is torch's seeded permutation's first ``k`` entries (only ``x.numel()`` is used).
    """
    return _select_flat(x, k, method, gen_seed, n_workers)[0]


def _select_flat(x: torch.Tensor, k: int, method: str, gen_seed: int,
                 n_workers: int | None = None) -> tuple[torch.Tensor, bool]:
    """:func:`select_flat`, and whether its pass found every value of ``x`` finite and
    >= +0.0 (the one-pass band of a large tensor checks that on the way)."""
    n = x.numel()
    if method == "random":
        return _random_flat(n, k, gen_seed), False
    if method not in METHODS:
        raise RegionsError(f"selection method '{method}' is not one of {METHODS}")
    lo, descending = window(method, n, k)
    if n <= SORT_LIMIT:  # small (rows, small matrices): one stable sort is fastest
        order = torch.sort(x, descending=descending, stable=True).indices[lo:lo + k]
        return torch.sort(order).values, False
    # Large: radix select in chunks, the same ranks as a stable sort in bounded memory
    # (a 45M-entry matrix at 7B scale would need ~1 GB to sort); non-negative scores first
    # through a sample's bounds (one pass, no full histogram), exact within them.
    got, proved = _sampled(x, lo, k, descending)
    if got is not None:
        return got, proved
    return select_window(lambda _: x, ["x"], {"x": n}, lo, k, descending, {"x": x.dtype},
                         n_workers=n_workers, split=True)["x"], proved


def checking_reader(scores: Mapping[str, torch.Tensor]
                    ) -> tuple[Callable[[str], torch.Tensor],
                               Callable[[str, torch.Tensor | None], None] | None]:
    """``(read, checked)`` for a selection that passes over the scores it ranks anyway.

    A lazy mapping that checks values as it reads them (``read(name, check=False)`` and
    ``mark_checked``: :class:`~lmeval_regions.artefacts.LazyScores`) is read unchecked;
    ``checked(name, None)`` then records a tensor the selection's own pass found finite and
    >= +0.0, ``checked(name, values)`` checks one it did not. Any other mapping:
    ``(its __getitem__, None)``, its values as it gives them.
    """
    read, mark = getattr(scores, "read", None), getattr(scores, "mark_checked", None)
    if callable(read) and callable(mark):
        return (lambda name: read(name, check=False)), mark
    return scores.__getitem__, None


SAMPLE = 1 << 16
"""Entries of a matrix sampled (evenly strided) to bound its rank window before one pass."""


def _sampled(x: torch.Tensor, lo: int, k: int, descending: bool
             ) -> tuple[torch.Tensor | None, bool]:
    """Ranks ``[lo, lo + k)`` of a large 1-D tensor of non-negative, NaN-free bf16/fp32
    scores in one pass: a strided sample gives keys below and above the window (with a 4-sigma
    margin), the pass takes the entries between them (a band holding every tie of its end
    keys) and counts those below, and the window is selected exactly within the band, ties by
    position. Returns ``(indices, proved)``: indices None (the caller ranks the tensor with
    histograms) for other dtypes, negatives or NaN, or when the band does not hold the
    window; ``proved``: the pass found every value finite and >= +0.0."""
    if x.dtype == torch.bfloat16:
        v, inf = x.view(torch.int16), _INF16
    elif x.dtype == torch.float32:
        v, inf = x.view(torch.int32), _INF32
    else:
        return None, False
    n = v.numel()
    # the window in ascending ranks, and its bounds read off the sorted sample with a margin
    a, b = (n - lo - k, n - lo) if descending else (lo, lo + k)
    vn = v.numpy()
    sample = np.sort(vn[::max(1, n // SAMPLE)])  # (torch sorts a strided view 30x slower)
    if sample[0] < 0 or sample[-1] > inf:
        return None, False  # the patterns are the keys only for non-negative, NaN-free values
    ns = sample.size

    def bound(rank: int, side: int) -> int | None:
        p = rank / n
        margin = 4 * math.sqrt(ns * p * (1 - p)) + 8
        i = math.floor(p * ns - margin) if side < 0 else math.ceil(p * ns + margin)
        return None if i < 0 or i >= ns else int(sample[i])

    lo_key, hi_key = bound(a, -1), bound(b, +1)
    # one pass: band, keys, count below, checks (into this thread's reused buffers)
    scanned = kernels.band_scan(vn, lo_key, hi_key, scratch=True)
    if scanned is None:
        return None, False  # negatives or NaN the sample missed
    band, band_keys, below = scanned
    above = n - below - band.size
    if below > a or below + band.size < b:
        return None, True  # the sample misjudged the window: rank exhaustively
    start = lo - (above if descending else below)  # the window's first rank within the band
    if x.dtype == torch.bfloat16:  # 16-bit keys: one histogram of the band's range
        return torch.from_numpy(kernels.band_window(
            band, band_keys, 0 if lo_key is None else lo_key,
            inf - 1 if hi_key is None else hi_key, start, start + k, descending)), True
    keys = torch.from_numpy(band_keys).view(x.dtype)
    inner = select_window(lambda _: keys, ["c"], {"c": keys.numel()}, start, k, descending,
                          {"c": x.dtype}, n_workers=1)["c"]
    return torch.from_numpy(band)[inner.long()], True


def _random_flat(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``n`` flat indices, uniformly without replacement: the first ``k`` of torch's
    permutation seeded ``seed``, sorted."""
    if _PREFIX_PERM_MIN <= n < 2**32 // 20 and k < n:
        return randperm_prefix(n, k, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def select_matrices(get: Callable[[str], torch.Tensor], names: list[str],
                    sizes: Mapping[str, int], ratio: float, method: str,
                    seeds: Mapping[str, int],
                    checked: Callable[[str, torch.Tensor | None], None] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Per-matrix selection of ``names`` (``n_select(size, ratio)`` entries each, by
    :func:`select_flat`), :func:`workers` matrices at once, each read by ``get`` once (not
    at all for ``random``). Returns ``name -> sorted indices`` (int32 where possible) in
    ``names`` order. ``checked`` (from :func:`checking_reader`; ``get`` then returns
    unchecked scores): told of every matrix read, with None when the selection's pass found
    its values finite and >= +0.0, else with the values, to check them."""
    n_workers = min(workers(), max(1, len(names)))

    def one(n: str) -> torch.Tensor:
        k = n_select(sizes[n], ratio)
        if method == "random":
            idx = _random_flat(sizes[n], k, seeds[n])
        else:
            x = get(n).detach().reshape(-1)
            idx, proved = _select_flat(x, k, method, seeds[n], n_workers=1)
            if checked is not None:
                checked(n, None if proved else x)
        return idx.to(index_dtype(sizes[n]))

    with _one_thread_per_op(n_workers):
        return dict(zip(names, _pmap(one, names, n_workers)))
