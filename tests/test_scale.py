"""Scale: bounded-memory selection, 16-bit accumulation, FSDP2 shards + merge."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from conftest import tiny_model

from lmeval_regions import regions
from lmeval_regions.artefacts import LazyScores, write_safetensors
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.importance import (
    Importance,
    ImportanceConfig,
    add_stochastic_bf16,
    compute_importance,
    merge_shards,
    save_shard,
    shard_path,
    shard_paths,
)
from lmeval_regions.regions import ranking, select_file


def _brute(scores, names, method, ratio):
    """Ranks by a stable sort of all entries concatenated (ties: parameter order, index)."""
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    k = regions.n_select(flat.numel(), ratio)
    if method == "top":
        idx = torch.sort(flat, descending=True, stable=True).indices[:k]
    else:
        start = 0 if method == "bottom" else (flat.numel() - k) // 2
        idx = torch.sort(flat, stable=True).indices[start:start + k]
    return sorted(idx.tolist())


def _flat(region, scores, names):
    out, off = [], 0
    for n in names:
        if n in region.indices:
            out += [int(i) + off for i in region.indices[n]]
        off += scores[n].numel()
    return sorted(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [5, 64])
def test_radix_selection_equals_stable_sort(monkeypatch, dtype, chunk):
    # Small chunks make every tensor span several chunks; few distinct values make many ties
    # (broken by position), signs and -0.0 exercise the key mapping.
    monkeypatch.setattr(ranking, "CHUNK", chunk)
    monkeypatch.setattr(ranking, "SORT_LIMIT", 0)  # per-matrix through the radix path too
    g = torch.Generator().manual_seed(1)
    scores = {
        "a": torch.randn(7, 9, generator=g).to(dtype),
        "b": torch.randint(0, 3, (5, 11), generator=g).to(dtype),
        "c": (torch.randn(13, generator=g).abs() * 1e-3).to(dtype),
    }
    scores["a"][0, 0] = -0.0
    scores["b"][1, 1] = 0.0
    names = list(scores)
    for method in ("top", "bottom", "middle"):
        for ratio in (0.01, 0.2, 0.5, 1.0):
            r = regions.select(scores, method, ratio, scope="global")
            assert _flat(r, scores, names) == _brute(scores, names, method, ratio), (method, ratio)
            m = regions.select(scores, method, ratio, scope="matrix")
            for n in names:
                assert m.indices[n].tolist() == _brute(scores, [n], method, ratio), (method, n)


def _edge_scores(dtype, seed=0):
    """Tensors mixing ties, signs, -0.0, +-inf and NaN (non-negative-only ones too, which are
    ranked on their raw bit patterns), with sizes that straddle chunk boundaries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(9, 11, generator=g)
    a[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), float("-inf")])
    a[1, 2], a[3, 3], a[5, 0] = float("nan"), float("nan"), -float("nan")
    b = torch.randint(0, 3, (6, 13), generator=g).float()  # few values: many ties
    c = torch.rand(29, generator=g) * 1e-3  # non-negative, no NaN: raw-pattern keys
    d = torch.rand(7, 8, generator=g)
    d[2, 5] = float("nan")  # non-negative with a NaN
    e = torch.full((40,), 0.5)  # one value: all tied
    return {n: t.to(dtype) for n, t in zip("abcde", (a, b, c, d, e))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_ranking_equals_stable_sort_on_edge_values(monkeypatch, dtype, workers, chunk):
    # Every scope/method/ratio against brute-force stable sorts, including NaN (ranked above
    # +inf, tied among themselves), -0.0 == 0.0, infinities, constant tensors; with several
    # threads (ties are still counted in position order) and tiny chunks.
    monkeypatch.setattr(ranking, "CHUNK", chunk)
    monkeypatch.setattr(ranking, "WORKERS", workers)
    monkeypatch.setattr(ranking, "SORT_LIMIT", 0)
    scores = _edge_scores(dtype)
    names = list(scores)
    for method in ("top", "bottom", "middle"):
        for ratio in (0.01, 0.13, 0.5, 0.999, 1.0):
            r = regions.select(scores, method, ratio, scope="global")
            assert _flat(r, scores, names) == _brute(scores, names, method, ratio), (method, ratio)
            m = regions.select(scores, method, ratio, scope="matrix")
            for n in names:
                assert m.indices[n].tolist() == _brute(scores, [n], method, ratio), (method, n)


@pytest.mark.parametrize("workers", [1, 2])
def test_select_flat_splits_one_tensor_between_workers(monkeypatch, workers):
    # One large in-memory tensor is shared between the threads in ranges: same ranks.
    monkeypatch.setattr(ranking, "CHUNK", 50)
    monkeypatch.setattr(ranking, "WORKERS", workers)
    monkeypatch.setattr(ranking, "SORT_LIMIT", 0)
    g = torch.Generator().manual_seed(4)
    for x in (torch.randint(0, 20, (1013,), generator=g).float(),
              torch.randn(1013, generator=g).to(torch.bfloat16)):
        for method in ("top", "bottom", "middle"):
            for k in (1, 37, 500, 1013):
                got = ranking.select_flat(x, k, method, 0)
                assert got.tolist() == _brute({"x": x}, ["x"], method, k / 1013), (method, k)


@pytest.mark.parametrize("n,k", [(2, 1), (10, 9), (1000, 10), (1000, 999), (70001, 1),
                                 (70001, 3500), (262144, 70000)])
def test_randperm_prefix_is_torch_randperm(n, k):
    # Random regions are the first k of torch's seeded permutation (the regions made before
    # the prefix computation existed), computed in O(k log k).
    for seed in (0, 1, 2**40 + 7):
        g = torch.Generator().manual_seed(seed)
        want = torch.sort(torch.randperm(n, generator=g)[:k]).values
        assert torch.equal(ranking.randperm_prefix(n, k, seed), want), (n, k, seed)
        assert torch.equal(ranking.select_flat(torch.empty(n), k, "random", seed), want)


def test_per_matrix_random_reads_no_scores():
    class Counting(dict):
        reads = 0

        def __getitem__(self, name):
            Counting.reads += 1
            return super().__getitem__(name)

    scores = Counting(a=torch.rand(300, 400), b=torch.rand(50))
    scores.shapes = {"a": [300, 400], "b": [50]}  # as LazyScores knows them from the header
    r = regions.select(scores, "random", 0.1, scope="matrix", seed=1)
    assert Counting.reads == 0 and r.counts() == {"a": 12000, "b": 5}


def _tiny_importance(tmp_path, dtype=torch.float32):
    model = tiny_model("llama")
    from conftest import random_batches

    imp = compute_importance(model, random_batches(3), progress=False)
    imp.scores = {n: t.to(dtype) for n, t in imp.scores.items()}
    path = tmp_path / "imp.safetensors"
    imp.save(path)
    return imp, path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_scores_selection_equals_in_memory(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(ranking, "CHUNK", 100)
    monkeypatch.setattr(ranking, "SORT_LIMIT", 0)
    imp, path = _tiny_importance(tmp_path, dtype)
    lazy = LazyScores(path)
    loaded = Importance.load(path).scores
    assert (list(lazy) == list(loaded)
            and lazy.shapes == {n: list(t.shape) for n, t in loaded.items()})
    assert all(lazy.dtypes[n] == dtype for n in lazy)
    for scope in ("matrix", "global", "row"):
        for method in ("top", "bottom", "middle", "random"):
            a = regions.select(lazy, method, 0.03, scope=scope, seed=3)
            b = regions.select(loaded, method, 0.03, scope=scope, seed=3)
            assert a.counts() == b.counts()
            assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices), (scope, method)
    r = select_file(path, "top", 0.03, scope="global")
    assert r.model == imp.model and r.spec["source"]["criterion"] == "sum_abs"
    with pytest.raises(ArtefactError, match="region"):
        LazyScores(path, kind="region")


def test_random_global_large_is_uniform_and_exact_size(monkeypatch):
    # Above the permutation limit the per-parameter counts come from the hypergeometric law.
    monkeypatch.setattr(ranking, "_RANDOM_PERM_LIMIT", 10)
    scores = {"a": torch.zeros(300, 100), "b": torch.zeros(100, 100)}
    r = regions.select(scores, "random", 0.1, scope="global", seed=5)
    assert r.numel() == 4000
    assert abs(r.counts()["a"] - 3000) < 150  # mean 3000, sd ~ 24
    r2 = regions.select(scores, "random", 0.1, scope="global", seed=5)
    assert all(torch.equal(r.indices[n], r2.indices[n]) for n in r.indices)
    assert all(torch.equal(i, torch.unique(i)) for i in r.indices.values())


def test_small_pages_turns_numpy_huge_pages_off_and_puts_them_back():
    import numpy as np

    from lmeval_regions import kernels

    switch = np._core.multiarray._set_madvise_hugepage  # returns the previous setting
    before = switch(True)
    try:
        with pytest.raises(RuntimeError, match="inside"), kernels.small_pages():
            assert switch(False) is False  # off inside
            raise RuntimeError("inside")
        assert switch(True) is True  # back on, even after an exception
    finally:
        switch(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_band_scan_equals_numpy(dtype):
    """The compiled scan = numpy's expressions: positions in [lo, hi], their patterns and the
    count below lo, for every kind of bound (ends, middle, empty, all, beyond the data), on
    lengths that are and are not whole blocks of 64; None when an entry is negative, NaN or
    infinite, in a whole block or in the tail."""
    import numpy as np

    from lmeval_regions import kernels

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(100_003, generator=g) * 3).to(dtype)
    x[::97] = 0.0  # ties at zero
    bits = x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy()
    q = [int(v) for v in np.quantile(bits, [0.3, 0.45, 0.7])]
    for part in (bits, bits[:9], bits[:32], bits[:64], bits[:65], bits[3:1000], bits[1:129]):
        for lo, hi in [(None, None), (None, q[0]), (q[2], None), (q[0], q[1]), (q[1], q[1]),
                       (q[1], q[0]), (int(bits.max()) + 1, None), (None, -1), (0, q[0])]:
            keep = np.ones(part.size, dtype=bool)
            if lo is not None:
                keep &= part >= lo
            if hi is not None:
                keep &= part <= hi
            pos, keys, below = kernels.band_scan(part, lo, hi)
            assert pos.dtype == np.int32 and keys.dtype == part.dtype
            assert np.array_equal(pos, np.flatnonzero(keep)), (part.size, lo, hi)
            assert np.array_equal(keys, part[keep]), (part.size, lo, hi)
            assert below == (0 if lo is None else int((part < lo).sum())), (part.size, lo, hi)
    for bad in (float("nan"), -1.0, -0.0, float("inf"), float("-inf")):
        for at in (5, -1):  # in a whole block and in the tail
            y = x.clone()
            y[at] = bad
            assert kernels.band_scan(y.view(bits.dtype == np.int16 and torch.int16
                                            or torch.int32).numpy(), q[0], None) is None, bad


def test_band_window_equals_a_stable_sort():
    """Ranks [a, b) of a band of bf16 patterns, descending or ascending, ties by position:
    positions[stable order][a:b], sorted -- on bands of few distinct keys (many ties at both
    ends), windows inside one key, empty and whole windows, bounds wider than the keys."""
    import numpy as np

    from lmeval_regions import kernels

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        lo = int(rng.integers(0, 0x7000))
        keys = rng.integers(lo, lo + int(rng.integers(1, 20)), size=n).astype(np.int16)
        pos = np.sort(rng.choice(100_000, size=n, replace=False)).astype(np.int32)
        a = int(rng.integers(0, n + 1))
        b = int(rng.integers(a, n + 1))
        hi = int(keys.max()) + int(rng.integers(0, 3))
        for desc in (False, True):
            order = np.argsort(-keys.astype(np.int64) if desc else keys, kind="stable")
            got = kernels.band_window(pos, keys, lo, hi, a, b, desc)
            assert got.dtype == np.int32
            assert np.array_equal(got, np.sort(pos[order][a:b])), (trial, desc, a, b)
    with pytest.raises(ValueError, match="outside a band of 3"):
        kernels.band_window(pos[:3], keys[:3], lo, hi, 2, 4, True)


def test_keep_window_equals_numpy():
    """The compiled in-place filter = numpy's masks: keys in [lo, hi], and of the entries at
    each tied key only the a-th to (b-1)-th in position order; none, one or two tied keys,
    slices empty, partial, whole and unbounded."""
    import math

    import numpy as np

    from lmeval_regions import kernels

    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(0, 300))
        keys = rng.integers(-3, 12, size=n).astype(np.int16 if trial % 2 else np.int32)
        pos = np.sort(rng.choice(10_000, size=n, replace=False)).astype(np.int32)
        lo, hi = sorted(int(v) for v in rng.integers(-3, 12, size=2))
        tied = rng.choice(np.arange(lo, hi + 1), size=min(int(rng.integers(0, 3)),
                                                           hi - lo + 1), replace=False)
        ties = []
        for k in tied:
            a = int(rng.integers(0, 6))
            b = math.inf if rng.random() < 0.2 else a + int(rng.integers(0, 6))
            ties.append((int(k), a, b))
        keep = (keys >= lo) & (keys <= hi)
        for k, a, b in ties:
            at = np.flatnonzero(keys == k)
            keep[at[:a]] = False
            if b != math.inf:
                keep[at[int(b):]] = False
        want = pos[keep].copy()
        got = kernels.keep_window(pos, keys, lo, hi, ties)
        assert np.array_equal(got, want), (trial, lo, hi, ties)
        assert got.base is pos or got.size == 0 or np.shares_memory(got, pos)  # in place
    with pytest.raises(ValueError, match="at most two tied keys"):
        kernels.keep_window(pos, keys, 0, 5, [(1, 0, 1)] * 3)


def test_random_global_beyond_a_billion_entries(monkeypatch):
    """Above numpy's hypergeometric limit (1e9 entries: a 7B model has 6.5e9) global random
    draws a uniform subset of the concatenation: exact size, distinct, in range, seeded."""
    monkeypatch.setattr(ranking, "_RANDOM_PERM_LIMIT", 10)
    monkeypatch.setattr(ranking, "_HYPERGEOMETRIC_LIMIT", 1000)
    scores = {"a": torch.zeros(300, 100), "b": torch.zeros(100, 100)}
    r = regions.select(scores, "random", 0.1, scope="global", seed=5)
    assert r.numel() == 4000
    assert abs(r.counts()["a"] - 3000) < 150  # mean 3000, sd ~ 24
    assert all(int(i.max()) < scores[n].numel() for n, i in r.indices.items())
    assert all(torch.equal(i, torch.unique(i)) for i in r.indices.values())
    r2 = regions.select(scores, "random", 0.1, scope="global", seed=5)
    assert all(torch.equal(r.indices[n], r2.indices[n]) for n in r.indices)


@pytest.mark.parametrize("sizes, chunk, fast", [([8], 1 << 20, 0), ([3, 4], 2, 0),
                                               ([2, 0, 5], 1 << 20, 1 << 32)])
def test_uniform_parts_is_uniform(monkeypatch, sizes, chunk, fast):
    """Every 3-subset of the concatenation equally often (chi-square over the C(n, 3)
    subsets, 500 draws per subset at fixed seeds), with repeats forced (k close to n) so the
    redraw path is exercised; the draws above 2^32 (rejected from a power of two) are forced
    (``fast`` 0) on parts of 3 and 4 entries, made 2 at a time; an empty part gets nothing."""
    from collections import Counter
    from math import comb

    import numpy as np
    from scipy.stats import chisquare

    monkeypatch.setattr(ranking, "DRAW_CHUNK", chunk)
    monkeypatch.setattr(ranking, "FAST_BOUNDED", fast)
    starts = np.cumsum([0] + sizes[:-1])
    n = sum(sizes)

    def draw(seed):
        parts = ranking.uniform_parts(sizes, 3, np.random.default_rng(seed))
        assert [p.dtype for p in parts] == [np.dtype(np.int64)] * len(sizes)
        assert all(list(p) == sorted(set(p)) and (p.size == 0 or 0 <= p[0] and p[-1] < s)
                   for p, s in zip(parts, sizes))
        return tuple(int(v) for p, s in zip(parts, starts) for v in p + s)

    counts = Counter(draw(s) for s in range(500 * comb(n, 3)))
    assert len(counts) == comb(n, 3)
    assert all(len(set(c)) == 3 for c in counts)
    assert chisquare(list(counts.values())).pvalue > 1e-3
    full = ranking.uniform_parts(sizes, n, np.random.default_rng(0))
    assert all(np.array_equal(p, np.arange(s)) for p, s in zip(full, sizes))
    with pytest.raises(RegionsError, match=f"{n + 1} distinct entries of {n}"):
        ranking.uniform_parts(sizes, n + 1, np.random.default_rng(0))


def test_write_safetensors_streams_pieces(tmp_path):
    from lmeval_regions.artefacts import load_artefact

    lay = {"x": (torch.bfloat16, [4, 3]), "y": (torch.float32, [5])}
    x = torch.randn(4, 3).bfloat16()
    y = torch.arange(5.0)
    p = write_safetensors(tmp_path / "f.safetensors", lay,
                          lambda n: (x[i:i + 1] for i in range(4)) if n == "x" else y,
                          {"mode": "abs_sum"}, kind="importance")
    t, doc = load_artefact(p, "importance")
    assert torch.equal(t["x"], x) and torch.equal(t["y"], y) and doc["mode"] == "abs_sum"
    with pytest.raises(ValueError, match="bytes"):
        write_safetensors(tmp_path / "g.safetensors", {"y": (torch.float32, [6])}, lambda n: y)
    assert not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize("size", [1, 4095, 4096, 20_000, 40_960])
def test_large_files_written_with_direct_io_are_byte_identical(tmp_path, monkeypatch, size):
    # Above DIRECT_MIN_BYTES the file goes through O_DIRECT from one staged buffer (8 KB
    # here: several flushes, a padded last block cut back); the bytes equal a buffered write.
    from lmeval_regions.artefacts import streaming

    lay = {"a": (torch.int32, [size]), "b": (torch.bfloat16, [3, 5])}
    a = torch.arange(size, dtype=torch.int32) * 7
    b = torch.randn(3, 5).bfloat16()
    make = {"a": (a[i:i + 999] for i in range(0, size, 999)), "b": b}.__getitem__
    plain = write_safetensors(tmp_path / "plain.safetensors", lay,
                              lambda n: (a[i:i + 999] for i in range(0, size, 999))
                              if n == "a" else b, {"m": 1}, kind="importance")
    finished = []
    real = streaming._DirectWriter.finish
    monkeypatch.setattr(streaming._DirectWriter, "finish",
                        lambda self: finished.append(self.length + self.used) or real(self))
    monkeypatch.setattr(streaming, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(streaming, "_STAGE", 8192)
    (tmp_path / "probe").touch()
    probe = streaming._DirectWriter.open(tmp_path / "probe")
    if probe is None:
        pytest.skip("this file system refuses O_DIRECT (the buffered path is taken)")
    probe.close()
    direct = write_safetensors(tmp_path / "direct.safetensors", lay, make, {"m": 1},
                               kind="importance")
    assert finished == [plain.stat().st_size]
    assert direct.read_bytes() == plain.read_bytes()
    # a producer that fails leaves nothing behind, as the buffered path does
    with pytest.raises(ValueError, match="bytes"):
        write_safetensors(tmp_path / "g.safetensors", {"a": (torch.int32, [size + 1])},
                          lambda n: a)
    assert not (tmp_path / "g.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.safetensors",
                                                          "plain.safetensors", "probe"]


# ---- 16-bit accumulation -----------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_within_bound():
    # 1.0 + 400 x 1e-3: every addend is below half a bf16 spacing of the sum (2^-8 at 1.0), so
    # round-to-nearest never moves; SR must land on 1.4 on average, within the documented bound.
    n, m, x = 400, 8192, 1e-3
    acc = torch.ones(m, dtype=torch.bfloat16)
    rtn = torch.ones(m, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        add_stochastic_bf16(acc, torch.full((m,), x), g)
        rtn = (rtn.float() + x).bfloat16()
    exact = 1.0 + n * x
    assert torch.all(rtn == 1.0)  # round-to-nearest stalls
    bound = 2 ** -8 * math.sqrt(sum((1.0 + i * x) ** 2 for i in range(1, n + 1)))
    err = acc.float() - exact
    assert abs(float(err.mean())) < 4 * bound / math.sqrt(m)  # unbiased
    assert float(err.std()) <= bound  # documented std bound


def _top_overlap(a: Importance, b: Importance, ratio: float) -> float:
    ra = regions.select(a.scores, "top", ratio, scope="matrix")
    rb = regions.select(b.scores, "top", ratio, scope="matrix")
    return regions.overlap(ra, rb)["jaccard"]


@pytest.mark.parametrize("criterion", ["sum_abs", "abs_sum"])
def test_bf16_accumulator_agrees_with_fp32_tiny(criterion):
    from conftest import random_batches

    model = tiny_model("llama")
    batches = random_batches(4)
    f32, b16, mag = (compute_importance(model, batches, ImportanceConfig(criteria=(c,), dtype=d),
                                        progress=False)
                     for c, d in ((criterion, "float32"), (criterion, "bfloat16"),
                                  ("abs_sum", "float32")))
    assert b16.extra["accumulator_dtype"] == "bfloat16"
    for n in f32.scores:
        # each of the 4 stochastic roundings errs by < one bf16 spacing of its partial sum,
        # <= 2^-7 |partial sum| <= 2^-7 Σ_b |θ·g_b| (abs_sum): at most 4 such errors
        err = (b16.scores[n] - f32.scores[n]).abs()
        assert bool((err <= 4 * 2 ** -7 * mag.scores[n] * (1 + 1e-5) + 1e-30).all()), n
    # tiny matrices: Top-10% (~100 entries per 32x32 matrix) so the overlap means something
    ov = _top_overlap(f32, b16, 0.1)
    print(f"tiny llama bf16 vs fp32 Top-10% Jaccard: {ov:.4f}")
    assert ov >= 0.95


@pytest.mark.slow
def test_bf16_vs_fp32_top1_overlap_gemma(gemma, shared_data):
    from lmeval_regions.corpora import batches, load_parallel

    model, tok = gemma
    texts = [u["text"] for u in load_parallel(langs=["en"])["en"][:6]]
    data = list(batches(tok, texts, batch_size=2, max_length=64))
    f32 = compute_importance(model, data, ImportanceConfig(dtype="float32"), progress=False)
    b16 = compute_importance(model, data, ImportanceConfig(dtype="bfloat16"), progress=False)
    ov = _top_overlap(f32, b16, 0.01)
    print(f"Gemma-3-270M bf16 vs fp32 Top-1% (per matrix) Jaccard: {ov:.5f} "
          f"over {len(data)} batches")
    assert ov >= 0.99


# ---- FSDP2: per-rank shards + merge == one process -----------------------------------------

def _global_batches(n=3, batch=4, seq=10, seed=0):
    # No padding: every rank's half of a batch has the same token count, so the mean of the two
    # ranks' mean losses (FSDP2 averages gradients) is the one-process loss of the whole batch.
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": ids.clone()})
    return out


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        half = [{k: v[rank::world] for k, v in b.items()} for b in _global_batches()]
        imp = compute_importance(model, half, progress=False)
        save_shard(imp, model, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_process_shards_merge_to_single_process_artefact(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "imp.safetensors"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    merged = merge_shards(shard_paths(out, 2), tmp_path / "merged.safetensors")

    single = compute_importance(tiny_model("llama"), _global_batches(), progress=False)
    single.save(tmp_path / "single.safetensors")
    a = Importance.load(merged, model=tiny_model("llama"))
    b = Importance.load(tmp_path / "single.safetensors")
    assert list(a.scores) == list(b.scores)
    assert (a.mode, a.model, a.n_sequences, a.n_tokens, a.n_skipped) == \
           (b.mode, b.model, b.n_sequences, b.n_tokens, b.n_skipped)
    for n in b.scores:
        assert a.scores[n].shape == b.scores[n].shape
        torch.testing.assert_close(a.scores[n], b.scores[n], rtol=1e-4, atol=1e-9)
    # both ranks wrote real rows (the shards split every matrix)
    from lmeval_regions.artefacts import read_metadata

    rows = [read_metadata(shard_path(out, r, 2))["shard"]["rows"] for r in range(2)]
    n0 = next(iter(b.scores))
    assert rows[0][n0][0] == 0 and rows[0][n0][1] == rows[1][n0][0] > 0

    # a missing rank is refused by name
    with pytest.raises(ArtefactError, match="ranks 0..1"):
        merge_shards([shard_path(out, 0, 2)], tmp_path / "bad.safetensors")


def test_bf16_accumulator_scores_stay_bf16_and_select_as_widened():
    """One process' bf16 accumulators give bf16 scores (their exact values, half the memory of
    fp32 copies); regions and sums are those of the values widened to fp32."""
    from conftest import random_batches

    model = tiny_model("llama")
    imp = compute_importance(model, random_batches(3), ImportanceConfig(dtype="bfloat16"),
                             progress=False)
    assert all(t.dtype == torch.bfloat16 for t in imp.scores.values())
    wide = {n: t.float() for n, t in imp.scores.items()}
    for scope in ("matrix", "global"):
        a = regions.select(imp.scores, "top", 0.05, scope=scope)
        b = regions.select(wide, "top", 0.05, scope=scope)
        assert all(torch.equal(a.indices[n], b.indices[n]) for n in b.indices)


@pytest.mark.parametrize("mapping", ["mapped", "no mmap"])
def test_lazy_scores_membership_and_transient_reads(tmp_path, monkeypatch, mapping):
    # `name in scores` reads nothing; inside transient_reads each tensor is a private mapping
    # of the file (no copy; writing to it leaves the file alone) or, where mapping fails, a
    # thread's reads share a buffer (each tensor valid until that thread's next read); the
    # selection gives the same region either way, and a truncated file is an error, not a
    # crash (a mapping past the end of a file raises SIGBUS when touched).
    from lmeval_regions.artefacts import streaming

    if mapping == "no mmap":
        def refuse(*a, **k):
            raise OSError("mmap refused")
        monkeypatch.setattr(streaming.mmap, "mmap", refuse)
    imp, path = _tiny_importance(tmp_path, torch.bfloat16)
    before = path.read_bytes()
    lazy = LazyScores(path)
    reads = []
    real = lazy._memory
    lazy._memory = lambda name: reads.append(name) or real(name)
    names = list(lazy)
    assert all(n in lazy for n in names) and "nope" not in lazy and reads == []
    with lazy.transient_reads():
        a, b = lazy[names[0]], lazy[names[1]]
        assert torch.equal(a, imp.scores[names[0]]) or mapping == "no mmap"  # (b reuses a's)
        assert torch.equal(b, imp.scores[names[1]])
        if mapping == "mapped":
            assert reads == [] and a.data_ptr() != b.data_ptr()  # mappings, not the buffer
            b.fill_(7.0)  # copy-on-write: the file is not changed
            assert torch.equal(lazy[names[1]], imp.scores[names[1]])
        else:
            assert reads == names[:2] and a.data_ptr() == b.data_ptr()  # the same buffer
    assert path.read_bytes() == before
    c, d = lazy[names[0]], lazy[names[1]]
    assert c.data_ptr() != d.data_ptr() and torch.equal(c, imp.scores[names[0]])
    loaded = Importance.load(path).scores  # file order: ties across parameters break by it
    for scope in ("matrix", "global", "row"):
        with lazy.transient_reads():
            r = regions.select(lazy, "top", 0.05, scope=scope)
        m = regions.select(loaded, "top", 0.05, scope=scope)
        assert all(torch.equal(r.indices[n], m.indices[n]) for n in m.indices), scope
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(before)
    short = LazyScores(cut)  # (a file truncated before it is opened is refused by the header)
    cut.write_bytes(before[:len(before) // 2])
    with pytest.raises(ArtefactError, match="truncated inside"), short.transient_reads():
        for n in names:
            short[n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_band_equals_stable_sort(monkeypatch, dtype):
    # Large non-negative tensors are ranked in one pass between bounds read off a strided
    # sample; ties (few distinct values) and a sample that misjudges the window (every
    # sampled entry 0, all others 1: the exhaustive ranking takes over) give a stable sort's
    # ranks all the same.
    monkeypatch.setattr(ranking, "SAMPLE", 512)
    monkeypatch.setattr(ranking, "CHUNK", 4096)
    g = torch.Generator().manual_seed(7)
    n = 20_011
    cases = [torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g).float()]
    biased = torch.ones(n)
    biased[::n // 512] = 0.0
    cases.append(biased)
    for x in cases:
        x = x.to(dtype)
        for method in ("top", "bottom", "middle"):
            for k in (1, 57, 2000, n - 1, n):
                got = ranking.select_flat(x, k, method, 0, n_workers=1)
                assert got.tolist() == _brute({"x": x}, ["x"], method, k / n), (method, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("workers", [1, 2])
def test_global_band_equals_stable_sort(tmp_path, monkeypatch, dtype, workers):
    # Global selection of non-negative scores in one pass between sampled bounds (in memory,
    # and from a file sampled block by block): the same ranks as a stable sort of everything,
    # ties across parameters by parameter order; a band too big for BAND_BYTES, and scores
    # with a negative entry the sample missed, fall back to the exhaustive passes.
    monkeypatch.setattr(ranking, "SAMPLE", 600)
    monkeypatch.setattr(ranking, "CHUNK", 1000)
    monkeypatch.setattr(ranking, "WORKERS", workers)
    g = torch.Generator().manual_seed(11)
    scores = {"a": torch.rand(70, 90, generator=g),
              "b": torch.randint(0, 7, (3001,), generator=g).float(),
              "c": torch.rand(40, 60, generator=g) * 3}
    scores = {n: t.to(dtype) for n, t in scores.items()}
    names = list(scores)
    path = tmp_path / "imp.safetensors"
    write_safetensors(path, {n: (t.dtype, list(t.shape)) for n, t in scores.items()},
                      scores.__getitem__, {"model": {}}, kind="importance")
    lazy = LazyScores(path)
    calls = []
    real = ranking._global_band
    monkeypatch.setattr(ranking, "_global_band",
                        lambda *a: calls.append(r := real(*a)) or r)
    for method in ("top", "bottom", "middle"):
        for ratio in (0.002, 0.05, 0.3, 0.97):
            want = _brute(scores, names, method, ratio)
            for source in (scores, lazy):
                r = regions.select(source, method, ratio, scope="global")
                assert _flat(r, scores, names) == want, (method, ratio)
    assert sum(c is not None for c in calls) >= 12  # most went through the band
    monkeypatch.setattr(ranking, "BAND_BYTES", 10)
    calls.clear()
    assert _flat(regions.select(scores, "top", 0.05, scope="global"), scores, names) == \
        _brute(scores, names, "top", 0.05)
    assert calls == [None]
    monkeypatch.setattr(ranking, "BAND_BYTES", 1 << 30)
    scores["b"][1234] = -1.0  # not in a sample of every 5th entry
    calls.clear()
    assert _flat(regions.select(scores, "bottom", 0.05, scope="global"), scores, names) == \
        _brute(scores, names, "bottom", 0.05)
    assert calls == [None]
