"""Regions: selection counts, global selection, set algebra, overlap, Eq. 5, entry specs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError
from lmeval_regions.regions import (
    Region,
    distribution,
    from_specs,
    monolingual,
    n_select,
    overlap,
    select,
)


def idx(region, name):
    return region.indices[name].tolist() if name in region.indices else []


# ---- selection on hand-made tensors ------------------------------------------------------

HAND = {"a": torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 9.0, 3.0, 2.0, 7.0, 4.0]),
        "b": torch.tensor([[1.0, 8.0], [8.0, 0.5]])}


@pytest.mark.parametrize("method,ratio,expected_a,expected_b", [
    ("top", 0.2, [5, 8], [1]),            # k=2 of 10 (9, 7); k=max(1, floor(0.8))=1 of 4: first 8
    ("top", 0.3, [0, 5, 8], [1]),         # k=3: 9, 7, 5
    ("bottom", 0.2, [1, 4], [3]),         # 0, 1; b: 0.5
    ("bottom", 0.5, [1, 2, 4, 7, 3], [0, 3]),  # 0,1,2 then ties at 3: lowest positions 2, 3
    ("middle", 0.2, [3, 6], [0]),         # sorted a: 0 1 2 3(2) 3(3) 3(6) 4..; start=(10-2)//2=4
    ("middle", 0.4, [2, 3, 6, 9], [0]),   # start 3: ranks 3..6 = 3(2),3(3),3(6),4(9);
                                          # b: k=floor(1.6)=1, start (4-1)//2=1: 1.0 at 0
])
def test_matrix_selection_hand_computed(method, ratio, expected_a, expected_b):
    r = select(HAND, method, ratio, "matrix")
    assert idx(r, "a") == sorted(expected_a)
    assert idx(r, "b") == sorted(expected_b)
    assert r.indices["a"].dtype == torch.int32
    assert r.shapes == {"a": [10], "b": [2, 2]}


def test_row_selection_hand_computed():
    s = {"m": torch.tensor([[1.0, 4.0, 2.0, 3.0], [9.0, 9.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])}
    assert idx(select(s, "top", 0.5, "row"), "m") == [1, 3, 4, 5, 8, 9]
    assert idx(select(s, "bottom", 0.25, "row"), "m") == [0, 6, 8]
    assert idx(select(s, "middle", 0.5, "row"), "m") == [2, 3, 4, 7, 9, 10]
    rnd = select(s, "random", 0.5, "row", seed=3)
    rows = rnd.coords("m")[:, 0].tolist()
    assert [rows.count(i) for i in range(3)] == [2, 2, 2]


def test_global_selection_hand_computed():
    r = select(HAND, "top", 3 / 14, "global")  # 9 (a5), 8 (b0,1), 8 (b1,0)
    assert idx(r, "a") == [5] and idx(r, "b") == [1, 2]
    r = select(HAND, "bottom", 2 / 14, "global")  # 0 (a4), 0.5 (b3)
    assert idx(r, "a") == [4] and idx(r, "b") == [3]


@pytest.mark.parametrize("scope", ["matrix", "row", "global"])
@pytest.mark.parametrize("method", ["top", "bottom", "middle", "random"])
@pytest.mark.parametrize("ratio", [0.01, 0.03, 0.37, 1.0])
def test_selection_counts_exact(scope, method, ratio):
    g = torch.Generator().manual_seed(1)
    scores = {"x": torch.rand(37, 29, generator=g), "y": torch.rand(101, generator=g),
              "z": torch.randint(0, 3, (8, 5), generator=g).float()}  # many ties
    r = select(scores, method, ratio, scope, seed=5)
    if scope == "matrix":
        for n, s in scores.items():
            assert r.indices[n].numel() == n_select(s.numel(), ratio)
    elif scope == "row":
        for n, s in scores.items():
            rows = s.view(-1, s.shape[-1]) if s.dim() > 1 else s.view(1, -1)
            k = n_select(rows.shape[1], ratio)
            assert r.indices[n].numel() == rows.shape[0] * k
            per_row = torch.bincount(r.coords(n)[:, 0] if s.dim() > 1 else torch.zeros(k).long(),
                                     minlength=rows.shape[0])
            assert per_row.tolist() == [k] * rows.shape[0]
    else:
        assert r.numel() == n_select(sum(s.numel() for s in scores.values()), ratio)
    for n, i in r.indices.items():  # sorted, unique, in range
        assert torch.equal(i, torch.unique(i)) and int(i.max()) < scores[n].numel()


def brute_global(scores, names, method, k):
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), j) for j, n in enumerate(names)])
    local = torch.cat([torch.arange(scores[n].numel()) for n in names])
    if method == "top":
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
    else:
        order = torch.sort(flat, stable=True).indices
        start = 0 if method == "bottom" else (flat.numel() - k) // 2
        order = order[start:start + k]
    return {n: sorted(local[order][owner[order] == j].tolist()) for j, n in enumerate(names)}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("method", ["top", "bottom", "middle"])
def test_global_selection_equals_brute_force(seed, method):
    g = torch.Generator().manual_seed(seed)
    kind = seed % 4
    shapes = [(int(torch.randint(1, 40, (1,), generator=g)),
               int(torch.randint(1, 40, (1,), generator=g)))
              for _ in range(4)] + [(int(torch.randint(1, 300, (1,), generator=g)),)]
    scores = {}
    for j, s in enumerate(shapes):
        if kind == 0:    # continuous
            t = torch.rand(s, generator=g)
        elif kind == 1:  # heavy ties
            t = torch.randint(0, 4, s, generator=g).float()
        elif kind == 2:  # values in one histogram bucket (differ only in low mantissa bits)
            t = 1.0 + torch.randint(0, 50, s, generator=g).float() * 2**-20
        else:            # wide dynamic range incl. zeros, negatives and near-ties across buckets
            t = torch.randn(s, generator=g) * 10 ** torch.randint(-8, 8, s, generator=g).float()
            t[torch.rand(s, generator=g) < 0.2] = 0.0
        scores[f"p{j}"] = t
    names = list(scores)
    total = sum(t.numel() for t in scores.values())
    for ratio in (1 / total, 0.013, 0.25, 0.5, 0.999, 1.0):
        k = n_select(total, ratio)
        r = select(scores, method, ratio, "global")
        assert {n: idx(r, n) for n in names} == brute_global(scores, names, method, k), (ratio, k)


def test_global_random_seeded_and_uniform():
    scores = {"a": torch.zeros(300, 10), "b": torch.zeros(700, 10)}
    r1 = select(scores, "random", 0.1, "global", seed=1)
    r2 = select(scores, "random", 0.1, "global", seed=1)
    r3 = select(scores, "random", 0.1, "global", seed=2)
    assert r1.numel() == 1000
    assert all(torch.equal(r1.indices[n], r2.indices[n]) for n in r1.indices)
    assert any(not torch.equal(r1.indices[n], r3.indices[n]) for n in r1.indices)
    assert 200 < r1.indices["a"].numel() < 400  # ~30 % of picks fall in 'a' (binomial, sd 14)


def test_random_matrix_selection_seeded_independent_of_order():
    s = {"a": torch.rand(50, 4), "b": torch.rand(30)}
    r1 = select(s, "random", 0.2, seed=7)
    r2 = select({"b": s["b"], "a": s["a"]}, "random", 0.2, seed=7)
    r3 = select(s, "random", 0.2, seed=8)
    assert all(torch.equal(r1.indices[n], r2.indices[n]) for n in s)
    assert not torch.equal(r1.indices["a"], r3.indices["a"])


@pytest.mark.parametrize("ratio", [0.01, 0.03, 0.05, 0.29, 0.5])
def test_region_size_is_floor_of_ratio_times_n_like_the_release(ratio):
    """Per matrix, Top = torch.topk(scores, k=int(ratio * n)) (paper 1's release), at least 1
    entry where ratio * n < 1. 0.29 * 100 = 28.999... selects 28, as int() does there."""
    g = torch.Generator().manual_seed(0)
    shapes = {"big": (40, 50), "hundred": (10, 10), "odd": (7, 9), "tiny": (3, 3)}
    scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}  # no ties
    r = select(scores, "top", ratio, "matrix")
    for n, s in scores.items():
        k = max(1, int(ratio * s.numel()))
        assert r.indices[n].numel() == k, (n, ratio)
        assert r.indices[n].tolist() == sorted(torch.topk(s.reshape(-1), k).indices.tolist())
    if ratio == 0.29:
        assert r.indices["hundred"].numel() == 28
    if ratio == 0.05:  # 0.05 * 9 = 0.45 < 1: one entry, not none
        assert r.indices["tiny"].numel() == 1


@pytest.mark.parametrize("ratio", [0, -0.1, 1.01, float("nan"), "abc"])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(RegionsError, match=r"ratio"):
        select(HAND, "top", ratio)


def test_unknown_method_scope_and_names():
    with pytest.raises(RegionsError, match="Did you mean: top"):
        select(HAND, "topp", 0.1)
    with pytest.raises(RegionsError, match="Did you mean: global"):
        select(HAND, "top", 0.1, "globl")
    with pytest.raises(RegionsError, match="no scores for parameter 'c'"):
        select(HAND, "top", 0.1, names=["c"])


# ---- set algebra, overlap, Eq. 5 ------------------------------------------------------------

def R(**sets):
    shapes = {n: [20] for n in sets}
    return Region({n: torch.tensor(sorted(v), dtype=torch.int32) for n, v in sets.items() if v},
                  shapes)


def test_set_algebra():
    a = R(x=[1, 2, 3, 10], y=[0, 5])
    b = R(x=[3, 4, 10], z=[7])
    assert {n: idx(a | b, n) for n in "xyz"} == {"x": [1, 2, 3, 4, 10], "y": [0, 5], "z": [7]}
    assert {n: idx(a & b, n) for n in "xyz"} == {"x": [3, 10], "y": [], "z": []}
    assert {n: idx(a - b, n) for n in "xyz"} == {"x": [1, 2], "y": [0, 5], "z": []}
    assert {n: idx(b - a, n) for n in "xyz"} == {"x": [4], "y": [], "z": [7]}
    assert (a | b).numel() == 8 and (a & b).numel() == 2
    assert (a & b).indices["x"].dtype == torch.int32
    bad = Region({"x": torch.tensor([1], dtype=torch.int32)}, {"x": [4, 5]})
    with pytest.raises(ArtefactError, match="'x' has shapes"):
        a | bad


def test_overlap_jaccard():
    a = Region({"l.0.q": torch.tensor([0, 1, 2, 3]), "l.1.q": torch.tensor([5])},
               {"l.0.q": [10], "l.1.q": [10], "l.1.k": [10]})
    b = Region({"l.0.q": torch.tensor([2, 3, 4]), "l.1.k": torch.tensor([5])},
               {"l.0.q": [10], "l.1.q": [10], "l.1.k": [10]})
    o = overlap(a, b)
    assert o["intersection"] == 2 and o["union"] == 7
    assert o["jaccard"] == pytest.approx(2 / 7)
    assert o["per_matrix"] == {"l.0.q": pytest.approx(2 / 5), "l.1.k": 0.0, "l.1.q": 0.0}
    assert o["per_layer"] == {"0": pytest.approx(2 / 5), "1": 0.0}
    # per module kind, pooled over layers: q = (2 + 0) / (5 + 1), k = 0 / 1
    assert o["per_module"] == {"q": pytest.approx(2 / 6), "k": 0.0}
    assert overlap(a, a)["jaccard"] == 1.0


def test_monolingual_eq5_hand_made():
    tops = {"ar": R(w=[1, 2, 3, 4]), "es": R(w=[3, 10]), "zh": R(w=[4, 11, 12])}
    bottoms = {"ar": R(w=[15, 16]), "es": R(w=[1, 16, 17]), "zh": R(w=[18, 12])}
    m = monolingual(tops, bottoms)
    # ar top minus (es top ∪ es bottom ∪ zh top ∪ zh bottom) = {1,2,3,4} - {1,3,4,10,...} = {2}
    assert idx(m["ar"]["top"], "w") == [2]
    assert idx(m["ar"]["bottom"], "w") == [15]       # 16 is es's bottom
    assert idx(m["es"]["top"], "w") == [10]           # 3 is ar's top
    assert idx(m["es"]["bottom"], "w") == [17]        # 1 ar top, 16 ar bottom
    assert idx(m["zh"]["top"], "w") == [11, 12]       # 4 is ar's top; 12 is zh's own bottom
    assert idx(m["zh"]["bottom"], "w") == [12, 18]
    assert m["ar"]["top"].spec["excluded"] == ["es", "zh"]
    assert idx(tops["ar"], "w") == [1, 2, 3, 4]       # inputs untouched
    with pytest.raises(RegionsError, match="same languages"):
        monolingual(tops, {"ar": bottoms["ar"]})


def test_monolingual_equals_the_set_algebra_of_eq5():
    """Eq. 5 by counting = each language's region minus the union of every other language's
    Top and Bottom (the set algebra, as written in the paper): random regions over matrices of
    several sizes, with a language's Top and Bottom overlapping and matrices some miss."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a": [7], "b": [40, 5], "c": [300]}

    def rand_region():
        idx = {}
        for n, s in shapes.items():
            size = math.prod(s)
            k = int(torch.randint(0, size // 3 + 1, (1,), generator=g))
            if k:
                idx[n] = torch.sort(torch.randperm(size, generator=g)[:k]).values.int()
        return Region(idx, shapes)

    langs = ["ar", "es", "ru", "zh"]
    tops = {l: rand_region() for l in langs}
    bottoms = {l: rand_region() for l in langs}
    got = monolingual(tops, bottoms)
    for l in langs:
        others = None
        for o in langs:
            if o != l:
                both = tops[o] | bottoms[o]
                others = both if others is None else others | both
        for band, src in (("top", tops[l]), ("bottom", bottoms[l])):
            want = src - others
            r = got[l][band]
            assert list(r.indices) == list(want.indices), (l, band)
            for n in want.indices:
                assert torch.equal(r.indices[n], want.indices[n]), (l, band, n)
                assert r.indices[n].dtype == want.indices[n].dtype
                assert r.shapes[n] == want.shapes[n]
    one = monolingual({"ar": tops["ar"]}, {"ar": bottoms["ar"]})  # nothing to exclude
    assert all(torch.equal(one["ar"]["top"].indices[n], tops["ar"].indices[n])
               for n in tops["ar"].indices)


def test_distribution_counts():
    r = Region({"model.layers.0.mlp.down_proj.weight": torch.tensor([0, 1]),
                "model.layers.1.mlp.down_proj.weight": torch.tensor([3]),
                "model.layers.1.self_attn.q_proj.weight": torch.tensor([0, 2, 4])},
               {"model.layers.0.mlp.down_proj.weight": [4, 4],
                "model.layers.1.mlp.down_proj.weight": [4, 4],
                "model.layers.1.self_attn.q_proj.weight": [4, 4]})
    d = distribution(r)
    assert d["per_layer"] == {"0": 2, "1": 4}
    assert d["per_module"] == {"mlp.down_proj": 3, "self_attn.q_proj": 3}


# ---- entry specs ------------------------------------------------------------------------------

def test_entry_specs_single_row_column_glob():
    m = tiny_model("llama")
    w = "model.layers.0.mlp.down_proj.weight"  # [32, 64]
    r = from_specs(m, "model.layers.1.input_layernorm.weight[7]")
    assert idx(r, "model.layers.1.input_layernorm.weight") == [7]
    r = from_specs(m, f"{w}[3, :]")
    assert idx(r, w) == list(range(3 * 64, 4 * 64))
    r = from_specs(m, f"{w}[:, 5]")
    assert idx(r, w) == [i * 64 + 5 for i in range(32)]
    assert r.coords(w)[:, 1].unique().tolist() == [5]
    r = from_specs(m, f"{w}[-1, -1]")
    assert idx(r, w) == [32 * 64 - 1]
    r = from_specs(m, "model.layers.*.input_layernorm.weight[2]; model.norm.weight")
    assert r.counts() == {"model.layers.0.input_layernorm.weight": 1,
                          "model.layers.1.input_layernorm.weight": 1, "model.norm.weight": 32}
    assert r.model["sha256"]


@pytest.mark.parametrize("spec,match", [
    ("model.layers.1.input_layernorm.weight[32]", r"index 32 is out of range.*size 32"),
    ("model.layers.0.mlp.down_proj.weight[0, 64]", r"index 64 is out of range"),
    ("model.layers.0.mlp.down_proj.weight[1, 2, 3]", r"has 3 indices.*shape \[32, 64\]"),
    ("model.layers.0.mlp.down_proj.weight[a]", r"'a' is not an integer"),
    ("model.layers.0.mlp.down_prj.weight[1]", r"matches no parameter.*Did you mean"),
    ("model.layer.*.input_layernorm.weight",
     r"matches no parameter.*Did you mean: .*input_layernorm"),
    ("x[1", r"not of the form"),
])
def test_entry_spec_errors(spec, match):
    with pytest.raises(RegionsError, match=match):
        from_specs(tiny_model("llama"), spec)


# ---- persistence ------------------------------------------------------------------------------

def test_region_save_load_and_model_check(tmp_path, arch):
    from conftest import random_batches

    from lmeval_regions.importance import compute_importance as ci
    from lmeval_regions.regions import select_from_importance

    m = tiny_model(arch)
    imp = ci(m, random_batches(n=1), progress=False)
    r = select_from_importance(imp, "top", 0.05)
    r.save(tmp_path / "r.safetensors")
    q = Region.load(tmp_path / "r.safetensors", m)
    assert q.spec["method"] == "top" and q.spec["source"]["criterion"] == "sum_abs"
    for n in r.indices:
        assert torch.equal(r.indices[n], q.indices[n]) and q.indices[n].dtype == torch.int32
    other = {"llama": "bloom", "gemma3": "bloom", "bloom": "llama"}[arch]
    with pytest.raises(ModelMismatchError, match="another model.*does not exist"):
        Region.load(tmp_path / "r.safetensors", tiny_model(other))


@pytest.mark.parametrize("method", ["top", "bottom", "middle"])
def test_global_selection_brute_force_with_tiny_chunks(method, monkeypatch):
    """The streaming pass must give the same answer when tensors span many chunks."""
    from lmeval_regions.regions import ranking

    monkeypatch.setattr(ranking, "CHUNK", 7)
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.randint(0, 5, (13, 11), generator=g).float(),
              "b": torch.rand(50, generator=g), "c": torch.randint(0, 5, (9,), generator=g).float()}
    total = sum(t.numel() for t in scores.values())
    for ratio in (0.01, 0.1, 0.5, 0.9):
        k = n_select(total, ratio)
        r = select(scores, method, ratio, "global")
        assert {n: idx(r, n) for n in scores} == brute_global(scores, list(scores), method, k)
