"""Dimensional dependence on the real Gemma-3-270M (slow tier, kept short: no importance run)."""

from __future__ import annotations

import pytest
import torch

from lmeval_regions.corpora import batches, load_parallel
from lmeval_regions.dimensions import (
    OutlierConfig,
    dimension_sweep,
    find_outliers,
    norm_perturbation,
    structured_region,
)
from lmeval_regions.interventions import Editor
from lmeval_regions.models import find_module_map
from lmeval_regions.perplexity import perplexity
from lmeval_regions.regions import from_specs

pytestmark = pytest.mark.slow


def test_gemma_dimensions(gemma, shared_data):
    model, tok = gemma
    mm = find_module_map(model)
    b = mm.blocks[3].projections
    # config: hidden 640, 4 heads x 256, 1 kv head, intermediate 2048, 18 layers
    assert len(mm.blocks) == 18 and mm.hidden_size == 640
    assert b["q"].shape == [1024, 640] and b["k"].shape == [256, 640]
    assert b["o"].shape == [640, 1024] and b["down"].shape == [640, 2048]
    assert mm.norm(1).offset == 1 and mm.norm(1).name == "model.layers.1.input_layernorm.weight"

    data = load_parallel(shared_data / "udhr_parallel_31.jsonl", ["en", "ru"])
    probe = [b for l in data for b in batches(tok, [data[l][0]["text"]], 1, 48)]
    rep = find_outliers(model, probe, OutlierConfig(ratio=20), mm)
    assert all(0 <= d < 640 for d in rep.dims) and len(rep.top_per_layer) == 18

    text = [data["en"][30]["text"]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("model.layers.1.")}
    ev = lambda: perplexity(model, tok, text, max_length=48)  # noqa: E731
    rows = dimension_sweep(model, [rep.top_per_layer[5][0]], ev, mmap=mm)
    # q/k/v columns (1024 + 256 + 256), o row (1024), gate/up columns and down row (3 x 2048)
    assert rows[1]["perturbed"] == 18 * (1024 + 256 + 256 + 1024 + 3 * 2048)
    region, iv = norm_perturbation(model, 1, 7, "reset", mmap=mm)
    assert iv.value == 0.0  # Gemma scales by 1 + w: effective 1 is raw 0
    # a Top-1 structured removal over a one-entry-per-row region touches whole rows only
    q = "model.layers.2.self_attn.q_proj.weight"
    sub = structured_region(model, from_specs(model, f"{q}[17, 3]"), "attn_heads", 1, "top",
                            mmap=mm)
    assert sub.mask(q)[17].all() and sub.mask(q).sum() == 640
    with Editor(model) as ed:
        ed.apply(sub, "zero")
        assert float(dict(model.named_parameters())[q].detach()[17].abs().sum()) == 0.0
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(before[n], p.detach())
