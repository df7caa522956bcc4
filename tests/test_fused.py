"""Fused projections and GPT-2 ``Conv1D`` weights (issue 16, items 2-3): the module map's logical
q/k/v (gate/up) against what the models themselves compute, per-logical-matrix selection from an
importance artefact, structured removal and heatmaps on GPT-2, the pre-load architecture check."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_config, tiny_model

from lmeval_regions.dimensions import SETTINGS, find_outliers, hidden_dims_region, structured_region
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import Importance, compute_importance
from lmeval_regions.models import (
    check_module_map,
    find_module_map,
    matrix_layouts,
    meta_model,
    qkv_rows,
)
from lmeval_regions.regions import Region, n_select, select, select_file, select_from_importance
from lmeval_regions.studies.region_plots import plot_region_heatmaps

FUSED_ARCHS = ["gpt_neox", "bloom", "gpt2"]


# ---- the logical matrices are the model's own q, k, v ---------------------------------------

def _capture_attention(model):
    """The (query, key, value) the first attention layer hands to the attention function
    (each [batch, heads, seq, head_dim])."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = {}

    def capture(module, query, key, value, attention_mask, **kw):
        got.setdefault("qkv", (query, key, value))  # layer 0
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("capture_qkv_test", capture)
    model.set_attn_implementation("capture_qkv_test")
    return got


def _logical_outputs(model, mm, x_in, layer=0):
    """q, k, v computed from the map's logical weights and biases: ``x @ W_l.T + b_l``."""
    params = dict(model.named_parameters())
    out = {}
    for role in "qkv":
        p = mm.blocks[layer].projections[role]
        w = p.logical(params[p.param].detach())
        b = params[p.param.rsplit(".", 1)[0] + ".bias"].detach()[p.torch_rows()]
        out[role] = x_in @ w.T + b
    return out


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3"])
def test_logical_qkv_are_what_the_attention_receives(arch):
    """At position 0 (rotary is the identity there) the model's own query/key/value, read in its
    attention function, equal x @ W_l.T for the map's logical q/k/v of the fused weight."""
    model = tiny_model(arch)
    if arch == "phi3":  # no biases: give the check some
        for b in model.model.layers:
            b.self_attn.qkv_proj.bias = torch.nn.Parameter(torch.randn(64) * 0.1)
    mm = find_module_map(model)
    q_param = mm.blocks[0].projections["q"].param
    fused_mod = dict(model.named_modules())[q_param.rsplit(".", 1)[0]]
    got = _capture_attention(model)
    seen = {}
    fused_mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 7, 9]]))
        mine = _logical_outputs(model, mm, seen["x"][0, 0])
    q, k, v = (t[0, :, 0, :].reshape(-1) for t in got["qkv"])  # heads-major, token 0
    torch.testing.assert_close(mine["q"], q)
    torch.testing.assert_close(mine["k"], k)
    torch.testing.assert_close(mine["v"], v)


def test_bloom_logical_qkv_are_its_own_reshape():
    model = tiny_model("bloom")
    mm = find_module_map(model)
    attn = model.transformer.h[0].self_attention
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        q, k, v = attn._reshape(attn.query_key_value(x))  # BLOOM's own split
        mine = _logical_outputs(model, mm, x[0, 1])
    for role, t in zip("qkv", (q, k, v)):
        torch.testing.assert_close(mine[role], t[0, :, 1, :].reshape(-1))


def test_phi3_gate_up_split_is_the_mlp():
    """down(act(gate) * up) from the logical gate/up rows equals Phi-3's MLP output."""
    model = tiny_model("phi3")
    mm = find_module_map(model)
    b = mm.blocks[0].projections
    params = dict(model.named_parameters())
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 32)
    with torch.no_grad():
        gate = x @ b["gate"].logical(params[b["gate"].param]).T
        up = x @ b["up"].logical(params[b["up"].param]).T
        want = mlp(x)
        got = (mlp.activation_fn(gate) * up) @ params[b["down"].param].T
    torch.testing.assert_close(got, want)
    assert b["gate"].param == b["up"].param and b["gate"].out_size == 64


def test_gpt2_conv1d_is_transposed():
    model = tiny_model("gpt2")
    p = find_module_map(model).blocks[0].projections
    assert all(p[r].transposed for r in ("q", "k", "v", "o", "up", "down"))
    assert p["up"].shape == [32, 128] and (p["up"].out_size, p["up"].in_size) == (128, 32)
    # c_attn is [in, 3 x hidden] and split [q | k | v] by columns (GPT-2's split(dim=2))
    assert p["k"].torch_rows().tolist() == list(range(32, 64))


def test_layout_that_matches_no_family_is_refused():
    """CodeGen's fused projection holds [q | v | k] per group: its value rows match neither
    layout, so the map refuses rather than mislabel k and v."""
    from transformers import AutoModelForCausalLM, CodeGenConfig

    cfg = CodeGenConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(RegionsError, match="match neither a per-head nor a concatenated"):
        find_module_map(model)
    # an explicit layout is taken as given
    assert find_module_map(model, fused_qkv="concatenated").blocks[0].projections["v"].rows[0] == 64


def test_qkv_rows_by_hand():
    # 4 heads, 2 kv heads, head_dim 1: per kv head [q q | k | v]
    r = qkv_rows("per_head", 4, 2, 1)
    assert (r["q"].tolist(), r["k"].tolist(), r["v"].tolist()) == ([0, 1, 4, 5], [2, 6], [3, 7])
    r = qkv_rows("concatenated", 4, 2, 1)
    assert (r["q"].tolist(), r["k"].tolist(), r["v"].tolist()) == ([0, 1, 2, 3], [4, 5], [6, 7])
    with pytest.raises(RegionsError, match="not one of"):
        qkv_rows("interleaved", 4, 2, 1)


# ---- selection per logical matrix ----------------------------------------------------------

def _parts_by_hand(arch):
    """Stored output indices of q, k, v of the fused weight, from each model's definition."""
    if arch == "gpt2":  # split(hidden, dim=2): columns [q | k | v]
        return 1, {r: torch.arange(32 * j, 32 * (j + 1)) for j, r in enumerate("qkv")}
    # BLOOM / GPT-NeoX: view(heads, 3, head_dim): per head [q | k | v] rows
    grid = torch.arange(96).view(4, 3, 8)
    return 0, {r: grid[:, j].reshape(-1) for j, r in enumerate("qkv")}


@pytest.fixture(scope="module")
def fused_importances(tmp_path_factory):
    out = {}
    for arch in FUSED_ARCHS + ["phi3"]:
        model = tiny_model(arch)
        imp = compute_importance(model, random_batches(2), progress=False)
        path = tmp_path_factory.mktemp(arch) / "imp.safetensors"
        imp.save(path)
        out[arch] = (model, imp, path)
    return out


@pytest.mark.parametrize("method", ["top", "bottom", "random"])
@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_split_selects_ratio_of_each_of_q_k_v(fused_importances, arch, method):
    model, imp, path = fused_importances[arch]
    ratio = 0.05
    region = select_from_importance(imp, method, ratio)  # fused="split" is the default
    out_dim, parts = _parts_by_hand(arch)
    fused = [n for n in imp.scores if n.endswith(("query_key_value.weight", "c_attn.weight"))]
    assert len(fused) == 2 and sorted(region.spec["split"]) == sorted(fused)
    for name in fused:
        scores = imp.scores[name]
        logical = scores if out_dim == 0 else scores.t()  # [96 outputs, 32 inputs]
        mask = region.mask(name)
        mask_l = mask if out_dim == 0 else mask.t()
        for role, rows in parts.items():
            n_sub = rows.numel() * 32
            got = mask_l[rows]
            assert int(got.sum()) == n_select(n_sub, ratio), (name, role)
            if method != "random":  # brute force: the k best of this part alone
                vals = logical[rows].reshape(-1)
                k = n_select(n_sub, ratio)
                order = torch.sort(vals, descending=method == "top", stable=True).indices[:k]
                want = torch.zeros(n_sub, dtype=torch.bool)
                want[order] = True
                assert torch.equal(got.reshape(-1), want), (name, role)
        # the other parameters are single matrices
    for name in set(imp.scores) - set(fused):
        assert region.counts()[name] == n_select(imp.scores[name].numel(), ratio)
    # the artefact read lazily gives the same region
    lazy = select_file(path, method, ratio)
    assert lazy.spec["split"] == region.spec["split"]
    for name in region.indices:
        assert torch.equal(lazy.indices[name], region.indices[name])


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_whole_is_the_fused_matrix_as_one(fused_importances, arch):
    _, imp, path = fused_importances[arch]
    ratio = 0.05
    region = select_from_importance(imp, "top", ratio, fused="whole")
    assert region.spec["fused"] == "whole" and region.spec["split"] == {}
    for name, s in imp.scores.items():
        k = n_select(s.numel(), ratio)
        want = torch.sort(
            torch.sort(s.reshape(-1), descending=True, stable=True).indices[:k]).values
        assert torch.equal(region.indices[name].long(), want), name
    # an importance without a layout record (older artefact) is selected whole, and says so
    old = Importance(imp.scores, imp.mode, imp.model)
    r_old = select_from_importance(old, "top", ratio)
    assert r_old.spec["layouts"] == "unknown" and r_old.spec["split"] == {}
    assert all(torch.equal(r_old.indices[n], region.indices[n]) for n in region.indices)


def test_phi3_gate_up_and_qkv_split(fused_importances):
    _, imp, _ = fused_importances["phi3"]
    region = select_from_importance(imp, "top", 0.05)
    gu = "model.layers.0.mlp.gate_up_proj.weight"
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert (region.spec["split"][gu] == ["gate", "up"]
            and region.spec["split"][qkv] == ["q", "k", "v"])
    m = region.mask(gu)
    assert int(m[:64].sum()) == int(m[64:].sum()) == n_select(64 * 32, 0.05)
    m = region.mask(qkv)  # 4 heads x 8 q rows, 2 kv heads x 8 k rows, x 8 v rows
    assert [int(m[a:b].sum()) for a, b in ((0, 32), (32, 48), (48, 64))] == \
        [n_select(32 * 32, 0.05), n_select(16 * 32, 0.05), n_select(16 * 32, 0.05)]


def test_row_scope_is_per_logical_row_on_conv1d(fused_importances):
    _, imp, _ = fused_importances["gpt2"]
    region = select_from_importance(imp, "top", 0.25, scope="row")
    name = "transformer.h.0.mlp.c_fc.weight"  # stored [32 in, 128 out]
    s, m = imp.scores[name], region.mask(name)
    k = n_select(32, 0.25)
    assert m.shape == (32, 128) and (m.sum(0) == k).all()
    for j in range(128):  # each output's k largest incoming scores
        want = torch.topk(s[:, j], k).indices
        assert set(torch.nonzero(m[:, j]).flatten().tolist()) == set(want.tolist())


def test_layouts_metadata_is_recorded_and_validated(fused_importances, tmp_path):
    model, imp, path = fused_importances["gpt2"]
    assert imp.extra["layouts"] == matrix_layouts(model, imp.scores)["layouts"]
    lay = Importance.load(path).extra["layouts"]["transformer.h.1.attn.c_attn.weight"]
    assert lay == {"out_dim": 1, "parts": {"q": [[0, 32]], "k": [[32, 64]], "v": [[64, 96]]}}
    bad = {"transformer.h.0.attn.c_attn.weight": {"out_dim": 1,
                                                  "parts": {"q": [[0, 32]], "k": [[32, 64]]}}}
    with pytest.raises(RegionsError, match="do not tile"):
        select(imp.scores, "top", 0.1, layouts=bad)
    with pytest.raises(RegionsError, match="fused 'halves' is not one of"):
        select(imp.scores, "top", 0.1, fused="halves")


# ---- GPT-2: structured removal by hand on transposed weights ----------------------------

# logical (out, in) per role of GPT-2's stored [in, out] weights; c_attn columns by role
def _gpt2_logical(model, layer):
    names = {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"}
    cols = {"q": torch.arange(0, 32), "k": torch.arange(32, 64), "v": torch.arange(64, 96)}
    out = {}
    for role, mod in names.items():
        w = dict(model.named_parameters())[f"transformer.h.{layer}.{mod}.weight"]
        c = cols.get(role, torch.arange(w.shape[1]))
        out[role] = (f"transformer.h.{layer}.{mod}.weight", c)
    return out


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gpt2_structured_removal_by_hand(setting):
    """Region entries placed so that, per role, logical out dim 3 and logical in dim 5 hold the
    most entries; the removal of each setting is then those whole logical rows/columns, written
    here on the stored [in, out] weights by hand."""
    model = tiny_model("gpt2")
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    masks = {}
    for layer in range(2):
        for role, (name, cols) in _gpt2_logical(model, layer).items():
            m = masks.setdefault(name, torch.zeros(shapes[name], dtype=torch.bool))
            # logical (o, i) is stored [i, cols[o]]: 3 entries on out 3, 3 on in 5
            for i in (0, 1, 2):
                m[i, cols[3]] = True
            for o in (6, 7, 8):
                m[5, cols[o]] = True
    region = Region({n: torch.nonzero(m.reshape(-1)).flatten().to(torch.int32)
                     for n, m in masks.items()}, {n: shapes[n] for n in masks})
    sub = structured_region(model, region, setting, 1, "top")
    expected = {}
    for layer in range(2):
        for role, side in SETTINGS[setting].items():
            if role not in ("q", "k", "v", "o", "up", "down"):
                continue  # no gate in GPT-2
            name, cols = _gpt2_logical(model, layer)[role]
            e = expected.setdefault(name, torch.zeros(shapes[name], dtype=torch.bool))
            if side == "out":
                e[:, cols[3]] = True  # logical row 3 = stored column cols[3]
            else:
                e[5, cols] = True  # logical column 5 = stored row 5, this role's columns
    assert set(sub.indices) == set(expected)
    for name, want in expected.items():
        assert torch.equal(sub.mask(name), want), name


def test_gpt2_hidden_dims_and_outliers_and_heatmaps(tmp_path):
    model = tiny_model("gpt2")
    r = hidden_dims_region(model, [4], roles=["o", "up"], layers=[0])
    o = r.mask("transformer.h.0.attn.c_proj.weight")  # o: hidden is its output = stored column
    up = r.mask("transformer.h.0.mlp.c_fc.weight")    # up: hidden is its input = stored row
    assert o[:, 4].all() and int(o.sum()) == 32
    assert up[4, :].all() and int(up.sum()) == 128
    rep = find_outliers(model, random_batches(1))
    assert len(rep.top_per_layer) == 2
    # heatmaps: one PNG per role, panels in logical [out, in] orientation
    region = select(dict(model.named_parameters()), "top", 0.05,
                    layouts=matrix_layouts(model)["layouts"])
    paths = plot_region_heatmaps(region, find_module_map(model), tmp_path, max_px=32)
    assert (sorted(p.stem for p in paths)
            == sorted(f"heatmap_{r}" for r in ("q", "k", "v", "o", "up", "down")))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ---- before any weight loads ----------------------------------------------------------------

@pytest.mark.parametrize("arch,fused,conv1d", [
    ("gpt2", {"c_attn": ["q", "k", "v"]}, True),
    ("bloom", {"query_key_value": ["q", "k", "v"]}, False),
    ("gpt_neox", {"query_key_value": ["q", "k", "v"]}, False),
    ("phi3", {"gate_up_proj": ["gate", "up"], "qkv_proj": ["q", "k", "v"]}, False),
    ("llama", {}, False), ("gemma3", {}, False), ("qwen2", {}, False)])
def test_check_module_map_from_config_only(tmp_path, arch, fused, conv1d):
    tiny_config(arch).save_pretrained(tmp_path)  # config.json only: no weights exist
    model = meta_model(str(tmp_path))
    assert next(model.parameters()).device.type == "meta"
    got = check_module_map(model)
    assert got["blocks"] == 2 and got["fused"] == fused and got["conv1d"] == conv1d


def test_check_module_map_refuses_unmappable_before_load(tmp_path):
    from transformers import MixtralConfig

    MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  num_local_experts=2).save_pretrained(tmp_path)
    model = meta_model(str(tmp_path))
    with pytest.raises(RegionsError, match="candidate MLP down projections"):
        check_module_map(model)
    # importance on such a model records why no logical layout is known instead of failing
    rec = matrix_layouts(model)
    assert rec["layouts"] is None and "candidate MLP down projections" in rec["layouts_error"]
