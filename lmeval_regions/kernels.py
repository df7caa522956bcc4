"""Compiled scans over the raw bit patterns of score tensors (numba).

Selecting a region from a 7B-scale importance file is memory-bound: every entry is looked at
once. numpy needs one pass per operation (two comparisons, an ``&``, ``nonzero``, a count, a
min and a max: six passes over each chunk, each into a fresh temporary); here one compiled pass
checks the patterns, takes the band's positions and (when asked) counts the entries below it.
The kernel releases the GIL, so the ranking's worker threads run it in parallel.

Inputs are the integer *views* of bf16 (``int16``) or fp32 (``int32``) tensors: for
non-negative, NaN-free values the bit pattern read as a signed integer orders like the value.
It is exact: it returns what the numpy expressions in its docstring return.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

_JIT: dict = {}


@contextmanager
def small_pages() -> Iterator[None]:
    """Within: numpy does not advise transparent huge pages for its large arrays (its default
    on Linux: ``madvise(MADV_HUGEPAGE)`` on every array of 4 MB or more).

    Why: with THP's ``defrag`` set to ``madvise`` (a common default, and this VM's) the kernel
    compacts memory to find a huge page at every first touch of such an array; with a 13 GB
    importance file in the page cache, 775 MB of fresh band arrays took 4-7 s to touch, 0.3 s
    in small pages (a global Middle extraction at 7B scale: 8.1-9.7 s -> 6.7-6.9 s). numpy's
    switch is process-wide: the previous setting is put back on exit. A no-op where numpy has
    no such switch."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if switch is None:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def _compiled():
    """The numba kernel, compiled on first use (numba's import and compilation cost about a
    second; ``cache=True`` keeps the machine code for later processes)."""
    if _JIT:
        return _JIT
    import numba
    from numba.cpython.unsafe.numbers import trailing_zeros

    @numba.njit(nogil=True, cache=True)
    def band(v, lo, hi, below_at, shift, count_below, out, keys):
        # v: the *unsigned* view of the patterns; positions i with lo <= v[i] <= hi into out
        # and their patterns into keys (counted beyond their size), and the count of
        # v[i] < below_at when count_below.
        # Per block of 64 the comparisons build a 64-bit mask (vectorised, no branch per
        # entry) and only its set bits are walked: a branch per entry mispredicts wherever the
        # band lies (measured 0.8 ns per entry with counted blocks of 16, 0.4 now).
        # Validity in the same pass: x | (x + shift) has the sign bit set exactly when x is a
        # negative (sign bit) or non-finite (at/above +inf's) pattern; OR-ed over the data.
        n = v.size
        cap = out.size
        m = 0
        below = 0
        acc = v.dtype.type(0)
        nb = n // 64
        for b in range(nb):
            s = b * 64
            mask = np.uint64(0)
            for j in range(64):
                x = v[s + j]
                mask |= np.uint64((x >= lo) & (x <= hi)) << np.uint64(j)
            a = v.dtype.type(0)
            for j in range(64):
                x = v[s + j]
                a |= x | v.dtype.type(x + shift)
            acc |= a
            if count_below:
                c = 0
                for j in range(64):
                    c += v[s + j] < below_at
                below += c
            while mask:
                j = trailing_zeros(mask)
                if m < cap:
                    out[m] = s + j
                    keys[m] = v[s + j]
                m += 1
                mask &= mask - np.uint64(1)
        for i in range(nb * 64, n):
            x = v[i]
            acc |= x | v.dtype.type(x + shift)
            if count_below and x < below_at:
                below += 1
            if (x >= lo) & (x <= hi):
                if m < cap:
                    out[m] = i
                    keys[m] = x
                m += 1
        return m, acc, below

    @numba.njit(nogil=True, cache=True)
    def keep_window(pos, keys, lo, hi, k1, a1, b1, k2, a2, b2, out):
        # The entries with lo <= key <= hi, where of the entries at key k1 (k2) only the
        # a1-th to (b1-1)-th in position order are kept: their positions into out, in order
        # (out may be pos itself: o <= i, each entry is read before it is written); returns
        # how many. No branch per entry (mid-distribution the cases alternate unpredictably):
        # every entry is written at o, and o only advances past a kept one.
        n_out = out.size
        o = 0
        r1 = 0
        r2 = 0
        for i in range(keys.size):
            key = np.int64(keys[i])
            at1 = np.int64(key == k1)
            at2 = np.int64(key == k2)
            keep = np.int64(key >= lo) & np.int64(key <= hi) \
                & ((1 - at1) | (np.int64(r1 >= a1) & np.int64(r1 < b1))) \
                & ((1 - at2) | (np.int64(r2 >= a2) & np.int64(r2 < b2)))
            if o < n_out:  # (taken until out is full: predictable)
                out[o] = pos[i]
            o += keep
            r1 += at1
            r2 += at2
        return o

    @numba.njit(nogil=True, cache=True)
    def window(pos, keys, lo, nbins, wa, wb, descending, out):
        # The band (pos ascending, keys[i] - lo in [0, nbins)) ranked by key (descending or
        # ascending), ties by position: ranks [wa, wb) into out, in position order. A
        # histogram of the keys gives the keys at both ends (and how many of their ties are
        # in); one pass in position order (keep_window) takes them. The histogram is kept in
        # four interleaved copies: mid-distribution a band holds few distinct keys, and one
        # copy would chain each increment on the previous one.
        hist4 = np.zeros((4, nbins), dtype=np.int64)
        for i in range(keys.size):
            hist4[i & 3, np.int64(keys[i]) - lo] += 1
        hist = hist4[0] + hist4[1] + hist4[2] + hist4[3]
        before = 0
        first = -1
        skip = 0
        last = -1
        take = 0
        for j in range(nbins):
            b = nbins - 1 - j if descending else j
            c = hist[b]
            if first < 0 and before + c > wa:
                first, skip = b, wa - before
            if before + c >= wb:
                last, take = b, wb - before
                break
            before += c
        kf, kl = first + lo, last + lo
        if first == last:  # one key: its tied entries skip..take-1
            return keep_window(pos, keys, kf, kf, kf, skip, take, -1, 0, 0, out)
        low, high = (kl, kf) if descending else (kf, kl)
        return keep_window(pos, keys, low, high, kf, skip, 1 << 62, kl, 0, take, out)

    _JIT.update(band=band, window=window, keep_window=keep_window)
    return _JIT


INF16, INF32 = 0x7F80, 0x7F800000
"""+inf as a bf16 / fp32 bit pattern: a non-negative, NaN-free value's pattern lies in [0, INF)."""
# pattern dtype -> (its unsigned view, +inf's pattern, the sign bit)
_KINDS = {np.dtype(np.int16): (np.uint16, INF16, 0x8000),
          np.dtype(np.int32): (np.uint32, INF32, 0x80000000)}


_LOCAL = threading.local()


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """This thread's reusable array ``name`` of at least ``size`` entries: fresh memory costs
    a page fault per 4 KB (on this VM up to ~10 us each: more than the scan itself)."""
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = np.empty(size, dtype=dtype)
        setattr(_LOCAL, name, buf)
    return buf[:size]


def band_scan(bits: np.ndarray, lo: int | None, hi: int | None, scratch: bool = False
              ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The band of ``bits`` (1-D ``int16`` of bf16 or ``int32`` of fp32 values, any length n)
    of scores expected finite, non-negative and NaN-free, in one pass.

    Returns ``(positions, keys, below)``: ``positions`` = ``np.flatnonzero((bits >= lo) &
    (bits <= hi))`` (ascending; int32 when n < 2^31, else int64; ``lo``/``hi`` None:
    unbounded), ``keys`` = ``bits[positions]`` and ``below`` = ``(bits < lo).sum()`` (0 when
    ``lo`` is None). Returns None when some entry is negative, NaN or infinite (a pattern
    below 0 or at/above +inf's), for which the caller ranks otherwise. ``scratch``: the
    positions and keys are views of this thread's reusable buffers, valid until its next
    ``band_scan(..., scratch=True)``.
    """
    utype, inf, sign = _KINDS[bits.dtype]
    pos_type = np.int32 if bits.size < 2**31 else np.int64
    if bits.size == 0:
        return np.empty(0, dtype=pos_type), bits[:0], 0
    # valid patterns lie in [0, inf): the band clamped there
    lo_ = 0 if lo is None else min(max(0, int(lo)), inf)
    hi_ = inf - 1 if hi is None else min(inf - 1, int(hi))
    # below is 0 when lo_ is 0 and n - m when nothing valid lies above the band: counted
    # in the pass only when neither end settles it
    count = 0 < lo_ and hi_ < inf - 1
    empty = hi_ < lo_
    band_lo, band_hi = (1, 0) if empty else (lo_, hi_)  # (1, 0): no pattern is in it
    cap = 0 if empty else min(bits.size, bits.size // 16 + 4096)
    u = bits.view(utype)
    args = (utype(band_lo), utype(band_hi), utype(lo_), utype(sign - inf), count)
    band = _compiled()["band"]

    def room(size: int) -> tuple[np.ndarray, np.ndarray]:
        if scratch:
            return _scratch("pos", size, pos_type), _scratch("keys", size, utype)
        return np.empty(size, dtype=pos_type), np.empty(size, dtype=utype)

    out, keys = room(cap)
    m, acc, below = band(u, *args, out, keys)
    if int(acc) & sign:
        return None
    if m > out.size:  # a wide band: a second pass with room for all of it
        out, keys = room(m)
        m, _, _ = band(u, *args, out, keys)
    if not count:
        below = 0 if lo_ == 0 else bits.size - m
    return out[:m], keys[:m].view(bits.dtype), int(below)


def keep_window(positions: np.ndarray, keys: np.ndarray, lo: int, hi: int,
                ties: list[tuple[int, int, int]]) -> np.ndarray:
    """The entries of ``(positions, keys)`` (in position order) with ``lo <= key <= hi``,
    where of the entries at each tied key ``k`` of ``ties`` (at most two ``(k, a, b)``) only
    the ``a``-th to ``(b - 1)``-th in position order are kept: their positions, in order.

    ``positions`` is overwritten (compacted in place, no new memory): the result is a view
    of it. One pass, no branch per entry."""
    if len(ties) > 2:
        raise ValueError(f"at most two tied keys, got {len(ties)}")
    spec = [(int(k), int(a), int(min(b, 2**62))) for k, a, b in ties]
    spec += [(hi + 1, 0, 0)] * (2 - len(spec))  # a key no entry in range has
    (k1, a1, b1), (k2, a2, b2) = spec
    m = _compiled()["keep_window"](positions, keys, int(lo), int(hi), k1, a1, b1, k2, a2, b2,
                                   positions)
    return positions[:m]


def band_window(positions: np.ndarray, keys: np.ndarray, lo: int, hi: int, start: int,
                stop: int, descending: bool) -> np.ndarray:
    """Ranks ``[start, stop)`` of a band of bf16 patterns (:func:`band_scan`'s ``positions``
    ascending and ``keys``, every key in ``[lo, hi]``), ranked by key (``descending`` or not),
    ties by position: their positions, ascending (the dtype of ``positions``).

    Exactly ``positions[order][start:stop]`` sorted, ``order`` a stable sort of ``keys``
    (negated when ``descending``). For 16-bit keys: one histogram of ``hi - lo + 1`` bins.
    """
    if not 0 <= start <= stop <= keys.size:
        raise ValueError(f"ranks [{start}, {stop}) are outside a band of {keys.size}")
    out = np.empty(stop - start, dtype=positions.dtype)
    if stop == start:
        return out
    u = keys.view(np.uint16)
    got = _compiled()["window"](positions, u, int(lo), int(hi) - int(lo) + 1, int(start),
                                int(stop), bool(descending), out)
    if got != out.size:  # (a key outside [lo, hi] would be the caller's error)
        raise ValueError(f"band_window took {got} entries, expected {out.size}")
    return out
