"""Interventions over regions: every kind, composed and overlapping, restored bit-exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_model

from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import compute_importance
from lmeval_regions.interventions import (
    Editor,
    Intervention,
    intervened,
    parse_edits,
    resolve_target,
)
from lmeval_regions.regions import Region, from_specs, select, select_from_importance


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_exact(model, snap):
    for n, p in model.named_parameters():
        # compare bit patterns: catches -0.0 vs 0.0 and NaN payloads too
        assert torch.equal(p.detach().view(torch.int32 if p.dtype == torch.float32
                                           else torch.int16),
                           snap[n].view(torch.int32 if p.dtype == torch.float32
                                        else torch.int16)), n


def regions_of(model):
    imp = compute_importance(model, random_batches(n=1), progress=False)
    top = select_from_importance(imp, "top", 0.1)
    rnd = select_from_importance(imp, "random", 0.3, seed=1)  # overlaps top
    return top, rnd


@pytest.mark.parametrize("kind", ["zero", "constant:1", "scale:10", "noise:0.5", "reinit"])
def test_each_kind_changes_exactly_the_region_and_restores(model, kind):
    top, _ = regions_of(model)
    snap = snapshot(model)
    iv = Intervention.parse(kind)
    with Editor(model) as ed:
        assert ed.apply(top, iv) == top.numel()
        for n, p in model.named_parameters():
            if n not in top.indices:
                assert torch.equal(p, snap[n]), n
                continue
            mask = top.mask(n)
            assert torch.equal(p[~mask], snap[n][~mask]), n
            new, old = p.detach()[mask], snap[n][mask]
            if iv.kind == "zero":
                assert bool((new == 0).all())
            elif iv.kind == "constant":
                assert bool((new == 1).all())
            elif iv.kind == "scale":
                torch.testing.assert_close(new, old * 10)
            elif iv.kind == "noise":
                d = new - old
                assert 0.3 < float(d.std()) < 0.7 and abs(float(d.mean())) < 0.2
            else:  # reinit: N(0, initializer_range^2), old values gone
                std = model.config.initializer_range
                assert abs(float(new.std()) / std - 1) < 0.3 and abs(float(new.mean())) < std
    assert_bit_exact(model, snap)


def test_composed_overlapping_edits_restore_bit_exactly(model):
    top, rnd = regions_of(model)
    assert (top & rnd).numel() > 0
    snap = snapshot(model)
    first = next(iter(top.indices))
    with intervened(model, [(top, "scale:4"), (rnd, "noise:0.1/3"), (top, "constant:2")]) as ed:
        assert ed.active
        p = model.get_parameter(first)
        assert bool((p.detach()[top.mask(first)] == 2).all())  # the last edit wins on overlaps
        both = (top & rnd)
        ed.apply(both, "zero")
        n = next(iter(both.indices))
        assert bool((model.get_parameter(n).detach()[both.mask(n)] == 0).all())
    assert_bit_exact(model, snap)


def test_restore_on_error_and_manual_restore(model):
    top, _ = regions_of(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError):
        with intervened(model, [(top, "zero")]):
            raise RuntimeError("evaluation failed")
    assert_bit_exact(model, snap)
    ed = Editor(model)
    ed.apply(top, Intervention("scale", 10.0))
    ed.apply(top, Intervention("scale", 10.0))
    ed.restore()
    assert not ed.active
    assert_bit_exact(model, snap)


def test_noise_and_reinit_are_seeded(model):
    top, _ = regions_of(model)
    n = next(iter(top.indices))
    vals = []
    for iv in ["noise:0.1/1", "noise:0.1/1", "noise:0.1/2", "reinit/1", "reinit/1"]:
        with Editor(model) as ed:
            ed.apply(top, iv)
            vals.append(model.get_parameter(n).detach().clone())
    assert torch.equal(vals[0], vals[1]) and not torch.equal(vals[0], vals[2])
    assert torch.equal(vals[3], vals[4])


def test_entry_spec_edit_reset_norm_to_one():
    m = tiny_model("gemma3")
    snap = snapshot(m)
    r = from_specs(m, "model.layers.*.input_layernorm.weight[3]")
    with intervened(m, [(r, "constant:1")]):
        for i in range(2):
            w = m.get_parameter(f"model.layers.{i}.input_layernorm.weight")
            assert float(w[3].detach()) == 1.0 and torch.equal(
                w[:3], snap[f"model.layers.{i}.input_layernorm.weight"][:3])
    assert_bit_exact(m, snap)


def test_bf16_model_restores_bit_exactly():
    m = tiny_model("llama").to(torch.bfloat16)
    r = select({n: p.detach().float().abs() for n, p in m.named_parameters() if p.dim() == 2},
               "top", 0.2)
    snap = snapshot(m)
    with intervened(m, [(r, "noise:0.3"), (r, "scale:3")]):
        pass
    assert_bit_exact(m, snap)


def test_intervention_parse_and_errors():
    assert Intervention.parse("scale:10") == Intervention("scale", 10.0)
    assert Intervention.parse("noise:0.02/7") == Intervention("noise", 0.02, 7)
    assert str(Intervention("scale", 4.0)) == "scale:4"
    with pytest.raises(RegionsError, match="Did you mean: zero"):
        Intervention.parse("zer")
    with pytest.raises(RegionsError, match="needs a value"):
        Intervention.parse("scale")
    with pytest.raises(RegionsError, match="not a number"):
        Intervention.parse("scale:x")
    with pytest.raises(RegionsError, match="std >= 0"):
        Intervention.parse("noise:-1")
    with pytest.raises(RegionsError, match="takes no value"):
        Intervention.parse("zero:3")


def test_parse_edits_and_resolve_target(tmp_path):
    m = tiny_model("llama")
    r = from_specs(m, "model.layers.0.mlp.down_proj.weight[0, :]")
    r.save(tmp_path / "r.safetensors")
    edits = parse_edits(f"{tmp_path / 'r.safetensors'};"
                        "model.layers.1.input_layernorm.weight[2]@constant:1")
    assert [str(iv) for _, iv in edits] == ["zero", "constant:1"]
    got = [resolve_target(m, t) for t, _ in edits]
    assert got[0].counts() == {"model.layers.0.mlp.down_proj.weight": 64}
    assert got[1].counts() == {"model.layers.1.input_layernorm.weight": 1}
    with pytest.raises(RegionsError, match="no region"):
        parse_edits(" ; ")


def test_region_for_missing_parameter_or_wrong_shape():
    m = tiny_model("llama")
    r = Region({"model.layers.0.mlp.down_prj.weight": torch.tensor([0])},
               {"model.layers.0.mlp.down_prj.weight": [32, 64]})
    with pytest.raises(RegionsError, match="lacks.*Did you mean"):
        Editor(m).apply(r, "zero")
    r = Region({"model.layers.0.mlp.down_proj.weight": torch.tensor([0])},
               {"model.layers.0.mlp.down_proj.weight": [64, 32]})
    with pytest.raises(RegionsError, match="does not match"):
        Editor(m).apply(r, "zero")
