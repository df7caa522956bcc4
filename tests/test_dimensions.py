"""Dimensional dependence on tiny models: hand-computed selections, the four removal settings'
shapes, outliers, perturbations and plots."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_model

from lmeval_regions.dimensions import (
    SETTINGS,
    OutlierConfig,
    dimension_counts,
    dimension_sweep,
    find_outliers,
    hidden_dim_ranking,
    hidden_dims_region,
    norm_perturbation,
    perturbation_table,
    removal_table,
    select_dims,
    structured_region,
)
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import find_module_map
from lmeval_regions.regions import Region, from_specs
from lmeval_regions.studies.region_plots import (
    neighbourhood_density,
    plot_distribution,
    plot_region_heatmaps,
    plot_sweep,
)

# ---- selection rules --------------------------------------------------------------------

COUNTS = torch.tensor([3, 0, 5, 1, 5, 2])


def test_select_dims_top_bottom_middle_by_hand():
    # top: the two 5s (indices 2, 4; ties to the lower index); bottom: 0 and 1 (indices 1, 3)
    assert select_dims(COUNTS, 2, "top").tolist() == [2, 4]
    assert select_dims(COUNTS, 1, "top").tolist() == [2]
    assert select_dims(COUNTS, 2, "bottom").tolist() == [1, 3]
    # ascending order: 1(0) 3(1) 5(2) 0(3) 2(5) 4(5); the middle two are positions 2..3
    assert select_dims(COUNTS, 2, "middle").tolist() == [0, 5]
    assert select_dims(COUNTS, 4, "middle").tolist() == [0, 2, 3, 5]
    assert select_dims(COUNTS, 10, "top").tolist() == [0, 1, 2, 3, 4, 5]  # capped at the size


def test_select_dims_random_is_seeded_and_uniform():
    a = select_dims(COUNTS, 3, "random", seed=1)
    assert a.tolist() == select_dims(COUNTS, 3, "random", seed=1).tolist()
    assert len(set(a.tolist())) == 3 and all(0 <= i < 6 for i in a.tolist())
    seen = torch.zeros(6)
    for s in range(300):
        seen[select_dims(COUNTS, 1, "random", seed=s)] += 1
    assert (seen > 20).all()  # every dim drawn, independent of the counts


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_select_dims_rejects_bad_n(bad):
    with pytest.raises(RegionsError, match="positive integer"):
        select_dims(COUNTS, bad, "top")


def test_select_dims_rejects_bad_method():
    with pytest.raises(RegionsError, match="'tops' is not one of"):
        select_dims(COUNTS, 1, "tops")


def test_dimension_counts_by_hand():
    m = tiny_model("llama")
    mm = find_module_map(m)
    q = mm.blocks[0].projections["q"]
    r = from_specs(m, "model.layers.0.self_attn.q_proj.weight[0, 1];"
                      "model.layers.0.self_attn.q_proj.weight[0, 2];"
                      "model.layers.0.self_attn.q_proj.weight[3, 1]")
    out, inn = dimension_counts(r, q, "out"), dimension_counts(r, q, "in")
    assert out[0] == 2 and out[3] == 1 and out.sum() == 3
    assert inn[1] == 2 and inn[2] == 1 and inn.sum() == 3
    assert dimension_counts(r, mm.blocks[1].projections["q"], "in").sum() == 0


# ---- module map ----------------------------------------------------------------------

def test_module_map_bloom_fused_qkv_rows():
    mm = find_module_map(tiny_model("bloom"))
    b = mm.blocks[0]
    # BLOOM: 4 heads x [q(8) | k(8) | v(8)] per head
    assert b.projections["q"].rows.tolist()[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 24, 25]
    assert b.projections["k"].rows.tolist()[:9] == [8, 9, 10, 11, 12, 13, 14, 15, 32]
    assert b.projections["v"].rows.tolist()[8] == 40
    assert "gate" not in b.projections and b.projections["up"].shape == [128, 32]


@pytest.mark.parametrize("arch,offset", [("llama", 0), ("gemma3", 1), ("bloom", 0)])
def test_norm_offset_is_measured(arch, offset):
    mm = find_module_map(tiny_model(arch))
    assert mm.norm(1).offset == offset
    assert mm.norm(1).name.endswith("input_layernorm.weight")


# ---- the four settings: which entries are removed ----------------------------------------

# logical dims per role: dim 5 holds 3 region entries, dim 7 one (BLOOM q/k/v: logical 9)
def _hand_region(model, arch):
    mm = find_module_map(model)
    specs = []
    for b in mm.blocks:
        for role, p in b.projections.items():
            rows = p.torch_rows()
            for side in ("out", "in"):
                d_top = 9 if (p.rows is not None and side == "out") else 5
                for d, others in ((d_top, (0, 1, 2)), (7, (3,))):
                    for o in others:
                        r, c = (int(rows[d]), o) if side == "out" else (int(rows[o]), d)
                        specs.append(f"{p.param}[{r}, {c}]")
    return from_specs(model, specs), mm


def _expected_mask(p, side, d):
    want = torch.zeros(p.shape, dtype=torch.bool)
    rows = p.torch_rows()
    if side == "out":
        want[int(rows[d]), :] = True
    else:
        want[rows, d] = True
    return want


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_settings_remove_the_hand_picked_rows_and_columns(arch, setting):
    model = tiny_model(arch)
    region, mm = _hand_region(model, arch)
    sub = structured_region(model, region, setting, 1, "top", mmap=mm)
    expected: dict[str, torch.Tensor] = {}
    for b in mm.blocks:
        for role, side in SETTINGS[setting].items():
            p = b.projections.get(role)
            if p is None:
                continue
            # out dims of q/k/v are split in BLOOM; in dims are hidden, dim 5 everywhere
            d = 9 if (p.rows is not None and side == "out") else 5
            m = _expected_mask(p, side, d)
            expected[p.param] = expected.get(p.param, torch.zeros_like(m)) | m
    assert set(sub.indices) == set(expected)
    for name, want in expected.items():
        assert torch.equal(sub.mask(name), want), name


# entries removed per block for N_d = 1, computed by hand from the tiny configs
# llama/gemma3: hidden 32, q 32x32, k/v 16x32, o 32x32, gate/up 64x32, down 32x64
# bloom: hidden 32, fused qkv 96x32 (q/k/v 32 rows each), dense 32x32, up 128x32, down 32x128
PER_BLOCK = {
    "llama": {"attn_heads+ffn_down": 32 * 3 + 32 + 64, "attn_heads": 32 * 3 + 32,
              "attn_hidden": 32 + 16 + 16 + 32, "ffn_hidden": 64 + 64 + 64},
    "bloom": {"attn_heads+ffn_down": 32 * 3 + 32 + 128, "attn_heads": 32 * 3 + 32,
              "attn_hidden": 32 * 3 + 32, "ffn_hidden": 128 + 128},
}
PER_BLOCK["gemma3"] = PER_BLOCK["llama"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_settings_sizes(arch, setting):
    model = tiny_model(arch)
    region, mm = _hand_region(model, arch)
    assert structured_region(model, region, setting, 1, "top", mmap=mm).numel() == \
        2 * PER_BLOCK[arch][setting]


def test_methods_pick_different_dims():
    model = tiny_model("llama")
    region, mm = _hand_region(model, "llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    top = structured_region(model, region, "attn_heads", 1, "top", mmap=mm)
    bottom = structured_region(model, region, "attn_heads", 1, "bottom", mmap=mm)
    # q row counts: row 5 -> 3; rows 0, 1, 2 (column-5 entries), 3 (column 7), 7 -> 1; the
    # other 26 rows -> 0. Bottom = the lowest-index zero row: 4.
    assert top.mask(q)[5].all() and top.mask(q).sum() == 32
    assert bottom.mask(q)[4].all() and bottom.mask(q).sum() == 32
    mid = structured_region(model, region, "attn_heads", 1, "middle", mmap=mm)
    # ascending order: zeros 4, 6, 8, 9, 10, ... (position p >= 2 is row p + 6), then the ones,
    # then 5; the middle one of 32 is position (32 - 1) // 2 = 15 -> row 21
    assert mid.mask(q)[21].all() and mid.mask(q).sum() == 32
    rnd = structured_region(model, region, "attn_heads", 3, "random", seed=1, mmap=mm)
    assert rnd.mask(q).sum() == 96


def test_protect_outlier_dims():
    model = tiny_model("llama")
    region, mm = _hand_region(model, "llama")
    # FFN setting: the top dims are all hidden dim 5 -> protecting 5 leaves nothing
    assert structured_region(model, region, "ffn_hidden", 1, "top", protect_dims=[5],
                             mmap=mm).numel() == 0
    # head setting: q row 5 loses only its entry on hidden column 5
    sub = structured_region(model, region, "attn_heads", 1, "top", protect_dims=[5], mmap=mm)
    q = sub.mask("model.layers.0.self_attn.q_proj.weight")
    assert q[5].sum() == 31 and not q[5, 5]
    o = sub.mask("model.layers.0.self_attn.o_proj.weight")  # o column 5 minus hidden row 5
    assert o[:, 5].sum() == 31 and not o[5, 5]


def test_hidden_dims_region_and_ranking(arch):
    model = tiny_model(arch)
    region, mm = _hand_region(model, arch)
    per_block = {"llama": 32 + 16 + 16 + 32 + 64 + 64 + 64, "gemma3": 288,
                 "bloom": 96 + 32 + 128 + 128}[arch]
    assert hidden_dims_region(model, [3], mmap=mm).numel() == 2 * per_block
    rank = hidden_dim_ranking(region, model, mmap=mm)
    assert int(torch.argmax(rank)) == 5
    with pytest.raises(RegionsError, match="outside"):
        hidden_dims_region(model, [32], mmap=mm)


def test_bad_setting_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(RegionsError, match="attn_head"):
        structured_region(model, Region({}, {}), "attn_head", 1, "top")


def test_removal_table_zeroes_then_restores():
    model = tiny_model("llama")
    region, mm = _hand_region(model, "llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    rows = removal_table(model, region, lambda: {"zeros": int((q == 0).sum())},
                         settings=["attn_heads"], methods=["top"], n_dims=[1, 3], mmap=mm)
    assert [r["zeros"] for r in rows] == [32, 96]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ---- outliers --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_outliers_find_planted_dims(arch):
    model = tiny_model(arch)
    mm = find_module_map(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] = 200.0  # a massive residual dim
        w = dict(model.named_parameters())[mm.norm(0).name]
        w[3] = 40.0 - mm.norm(0).offset  # effective scale 40 against ~1
    rep = find_outliers(model, random_batches(), OutlierConfig(ratio=50), mm)
    assert rep.dims == [7]
    assert rep.norm[0]["dim"] == 3 and rep.norm[0]["norms"][0]["name"] == mm.norm(0).name
    assert abs(rep.norm[0]["norms"][0]["scale"] - 40.0) < 1e-4
    assert 7 in rep.top_per_layer[0]
    plain = find_outliers(tiny_model(arch), random_batches(), OutlierConfig(ratio=50))
    assert plain.dims == [] and plain.norm == []


def test_outlier_config_validates():
    with pytest.raises(RegionsError, match="ratio"):
        OutlierConfig(ratio=0.5)


# ---- perturbations ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,reset_raw", [("llama", 1.0), ("gemma3", 0.0), ("bloom", 1.0)])
def test_norm_perturbation_values(arch, reset_raw):
    model = tiny_model(arch)
    mm = find_module_map(model)
    nm = mm.norm(1)
    w = float(dict(model.named_parameters())[nm.name].detach()[4])
    region, iv = norm_perturbation(model, 1, 4, "reset", mmap=mm)
    assert region.numel() == 1 and iv.value == reset_raw
    _, iv10 = norm_perturbation(model, 1, 4, "scale", 10, mmap=mm)
    assert iv10.value == pytest.approx(10 * (w + nm.offset) - nm.offset)
    with pytest.raises(RegionsError, match="outside"):
        norm_perturbation(model, 1, 99, "reset", mmap=mm)


def test_sweep_and_table_restore_and_report():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    g = params["model.layers.1.mlp.gate_proj.weight"]
    rows = dimension_sweep(model, [2, 9], lambda: {"col2": float(g[:, 2].abs().sum()),
                                                 "col9": float(g[:, 9].abs().sum())})
    assert rows[0]["dim"] is None and [r["dim"] for r in rows[1:]] == [2, 9]
    assert rows[1]["col2"] != rows[0]["col2"] and rows[1]["col9"] == rows[0]["col9"]
    assert rows[1]["perturbed"] == 2 * 288
    n = params["model.layers.1.input_layernorm.weight"]
    table = perturbation_table(model, [4], lambda: {"v": float(n[4])})
    assert [r["perturbation"] for r in table] == ["-", "reset 1", "mul 10"]
    assert table[1]["v"] == 1.0 and table[2]["v"] == pytest.approx(10 * table[0]["v"])
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())


# ---- plots -----------------------------------------------------------------------------

def test_neighbourhood_density_by_hand():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[2, 2] = True
    d = neighbourhood_density(m, None)
    assert torch.allclose(d[1:4, 1:4], torch.full((3, 3), 1 / 9))
    assert d.sum() == pytest.approx(1.0)
    full = neighbourhood_density(torch.ones(3, 3, dtype=torch.bool), None)
    assert full[1, 1] == pytest.approx(1.0) and full[0, 0] == pytest.approx(4 / 9)
    assert full[0, 1] == pytest.approx(6 / 9)
    assert neighbourhood_density(torch.ones(300, 40, dtype=torch.bool), 128).shape == (128, 40)


def test_plots_write_pngs(tmp_path, arch):
    model = tiny_model(arch)
    region, mm = _hand_region(model, arch)
    paths = plot_region_heatmaps(region, mm, tmp_path)
    paths.append(plot_distribution(region, tmp_path / "dist.png"))
    paths.append(plot_sweep([{"dim": None, "ppl": 5.0}, {"dim": 3, "ppl": 50.0}],
                            tmp_path / "sweep.png"))
    n_roles = 7 if arch != "bloom" else 6
    assert len(paths) == n_roles + 2
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_registers_subcommands():
    from lmeval_regions.cli.main import build_parser, commands
    from lmeval_regions.cli.options import build_sections

    cmd = {c.name: c for c in commands()}["dims-report"]
    ns = build_parser().parse_args(["dims-report", "--out", "x", "--n-dims", "1,3"])
    assert ns._command is cmd
    assert build_sections(cmd.sections, ns)["report"].n_dims == (1, 3)
    bad = build_parser().parse_args(["dims-report", "--out", "x", "--n-dims", "1,x"])
    with pytest.raises(RegionsError, match="'x' is not a valid int"):
        build_sections(cmd.sections, bad)


def test_dims_report_command_tiny(tiny_lm_dir, tmp_path):
    """`lmeval-regions dims-report` end to end on a tiny model: every section and figure, and
    a second run that reuses the importance file and describes it from its own metadata."""
    import json

    from lmeval_regions.cli import main

    out = tmp_path / "dims"
    argv = ["dims-report", "--model", str(tiny_lm_dir), "--langs", "en,fr", "--units", "2",
            "--eval-units", "1", "--outlier-units", "1", "--n-dims", "1,2", "--top-dims", "2",
            "--new-tokens", "3", "--max-length", "32", "--ratio", "0.05", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["importance"]["languages"] == ["en", "fr"] and doc["importance"]["n_sequences"] == 4
    assert {r["setting"] for r in doc["removal"]} == {"attn_heads+ffn_down", "attn_heads",
                                                      "attn_hidden", "ffn_hidden"}
    assert {r["method"] for r in doc["removal"]} == {"top", "middle", "bottom", "random"}
    assert doc["sweep"] and doc["single_parameter"] and doc["generations"]
    for name in doc["figures"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "over en, fr (4 sequences" in md and "## Structured removal" in md
