"""The freeze-region adapter: bit-identical frozen entries under AdamW + weight decay, clipping,
accumulation, schedules and mixed precision; clipped norm without frozen entries; soft variant."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batches, tiny_model
from trainer_utils import make_trainer, top_region

from lmeval_regions.errors import RegionsError
from lmeval_regions.models import block_parameters
from lmeval_regions.regions import select
from trainer_ext import FreezeRegionAdapter, FreezeRegionCallback, FreezeRegionConfig
from trainer_ext.freeze_config import CONFIG_NAME
from trainer_ext.importance_callback import ImportanceCallback  # noqa: F401  (import check)


def region_values(model, region):
    params = dict(model.named_parameters())
    return {n: params[n].detach().reshape(-1)[i.long()].clone() for n, i in region.indices.items()}


def outside_changed(model, before, region) -> float:
    """Fraction of entries outside the region (in covered params) that changed."""
    params = dict(model.named_parameters())
    changed = total = 0
    for n in region.indices:
        m = ~region.mask(n).reshape(-1)
        diff = params[n].detach().reshape(-1)[m] != before[n].reshape(-1)[m]
        changed += int(diff.sum())
        total += int(m.sum())
    return changed / total


def train_loop(model, optimizer, n_steps=5, accum=2, max_norm=0.05, sched=None, adapter=None):
    """Plain loop: accumulate `accum` micro-batches, clip, step; returns pre-clip norms."""
    batches = random_batches(n=n_steps * accum, batch=2, seq=10, seed=3)
    norms = []
    model.train()
    for s in range(n_steps):
        for b in batches[s * accum:(s + 1) * accum]:
            (model(**b).loss / accum).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        optimizer.step()
        if sched is not None:
            sched.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum", "adam_amsgrad"])
def test_frozen_bit_identical_plain_loop(arch, opt_name):
    model = tiny_model(arch)
    region = top_region(model, 0.05)
    before_region = region_values(model, region)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    elif opt_name == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    with FreezeRegionAdapter(model, region, opt):
        norms = train_loop(model, opt, sched=sched)
    assert min(norms) > 0.05, "clipping must be active for this test to mean anything"
    after = region_values(model, region)
    for n in before_region:
        assert torch.equal(after[n], before_region[n]), n
    assert outside_changed(model, before, region) > 0.9


def test_without_adapter_region_moves(arch):
    """Control: the same loop without the adapter moves the region (the test above can fail)."""
    model = tiny_model(arch)
    region = top_region(model, 0.05)
    before_region = region_values(model, region)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    adapter = FreezeRegionAdapter(model, region, opt)
    adapter.remove()  # hooks gone: nothing protects the region any more
    train_loop(model, opt)
    after = region_values(model, region)
    assert any(not torch.equal(after[n], before_region[n]) for n in after)


@pytest.mark.parametrize("band", ["top", "bottom"])
def test_remove_then_freeze_keeps_region_exactly_zero(tmp_path, arch, band):
    """Paper 1 Table 2 `Top & Freeze` / `Bottom & Freeze`: zeroed at attach, still exactly zero
    after AdamW steps with weight decay, clipping and accumulation; everything else trains."""
    model = tiny_model(arch)
    region = top_region(model, 0.05) if band == "top" else select(
        {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2))
         for n, p in block_parameters(model, include_norms=True).items()}, "bottom", 0.05)
    region.save(tmp_path / "r.safetensors")
    assert any(bool((v != 0).all()) for v in region_values(model, region).values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), init="zero")
    with FreezeRegionAdapter(model, cfg, opt):
        for n, v in region_values(model, region).items():  # removed at attach
            assert bool((v == 0).all()), n
        norms = train_loop(model, opt)
    assert min(norms) > 0.05, "clipping must be active for this test to mean anything"
    for n, v in region_values(model, region).items():
        assert bool((v == 0).all()) and not bool(torch.signbit(v).any()), n  # +0.0 exactly
    assert outside_changed(model, before, region) > 0.9


def test_zeroed_region_moves_without_the_adapter_and_when_unfrozen(tmp_path):
    """Controls: zeroing alone does not keep a region at zero under AdamW (gradients and
    decay move it), and `Top & Unfreeze` (init=zero, alpha=1) trains it freely, hooking no
    step."""
    for unfreeze in (False, True):
        model = tiny_model("llama")
        region = top_region(model, 0.05)
        region.save(tmp_path / "r.safetensors")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        cfg = FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), init="zero",
                                 alpha=1.0 if unfreeze else 0.0)
        adapter = FreezeRegionAdapter(model, cfg, opt)
        if unfreeze:
            assert not cfg.mask_grads and not adapter.config.frozen and cfg.free
        else:
            adapter.remove()  # zeroed, then nothing protects the region
        assert all(bool((v == 0).all()) for v in region_values(model, region).values())
        train_loop(model, opt)
        after = region_values(model, region)
        moved = sum(int((v != 0).sum()) for v in after.values())
        assert moved > 0.9 * region.numel(), (unfreeze, moved, region.numel())
        adapter.remove()


def test_remove_then_freeze_with_the_trainer_and_resume(tmp_path):
    """The callback zeroes at step 0 only: a resumed run does not zero again (with alpha=1 the
    region trained since the checkpoint would otherwise be lost)."""
    model = tiny_model("llama")
    region = top_region(model, 0.05)
    region.save(tmp_path / "r.safetensors")
    cfg = FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), init="zero", alpha=1.0)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    make_trainer(model, tmp_path / "out", [FreezeRegionCallback(cfg)], **kw).train()
    full = region_values(model, region)
    assert sum(int((v != 0).sum()) for v in full.values()) > 0.9 * region.numel()
    resumed = tiny_model("llama", seed=1)
    trainer = make_trainer(resumed, tmp_path / "out", [FreezeRegionCallback(cfg)], **kw)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for n, v in region_values(resumed, region).items():
        assert torch.equal(v, full[n]), n


def test_masked_grads_alone_do_not_freeze_under_weight_decay():
    """Why restoring is needed: zero grads + AdamW weight decay still move entries."""
    model = tiny_model("llama")
    region = top_region(model, 0.05)
    before_region = region_values(model, region)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    adapter = FreezeRegionAdapter(model, region)  # grad hooks only, no optimizer hooks
    train_loop(model, opt, n_steps=2)
    adapter.remove()
    after = region_values(model, region)
    assert any(not torch.equal(after[n], before_region[n]) for n in after)


def test_clipped_norm_excludes_frozen_entries(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    twin = tiny_model(arch)
    region = top_region(model, 0.05)
    batches = random_batches(n=2, batch=2, seq=10, seed=5)
    with FreezeRegionAdapter(model, region, None):
        for b in batches:  # two micro-batches: the hook must re-mask after each accumulation
            (model(**b).loss / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    for b in batches:
        (twin(**b).loss / 2).backward()
    full = torch.nn.utils.clip_grad_norm_(twin.parameters(), float("inf"))
    grads = []
    for n, p in twin.named_parameters():
        g = p.grad.clone()
        if n in region.indices:
            g.view(-1)[region.indices[n].long()] = 0
        grads.append(g.reshape(-1))
    manual = torch.linalg.vector_norm(torch.cat(grads).double())
    # clip_grad_norm_'s fp32 result, up to summation order
    torch.testing.assert_close(norm.double(), manual, rtol=1e-5, atol=0)
    # in fp64, the adapter's gradient norm is the masked one, not the full one
    ours = torch.linalg.vector_norm(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    torch.testing.assert_close(ours, manual, rtol=1e-12, atol=0)
    assert float(full) - float(manual) > 1e-5 * float(manual)  # region grads are not negligible
    for n, p in model.named_parameters():
        if n in region.indices:
            assert torch.all(p.grad.view(-1)[region.indices[n].long()] == 0)


@pytest.mark.parametrize("alpha,max_update", [(0.3, None), (1.0, 1e-3), (0.5, 2e-4), (0.0, 1e-3)])
def test_soft_variant_math(tmp_path, alpha, max_update):
    model, twin = tiny_model("llama"), tiny_model("llama")
    region = top_region(model, 0.1)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, twin)]
    path = tmp_path / "r.safetensors"
    region.save(path)
    cfg = FreezeRegionConfig(region=str(path), alpha=alpha, max_update=max_update)
    assert not cfg.mask_grads  # a soft region keeps its gradients
    adapter = FreezeRegionAdapter(model, cfg, opts[0])
    b = random_batches(n=1, batch=2, seq=10, seed=7)[0]
    for m, opt in zip((model, twin), opts):
        m(**b).loss.backward()
        opt.step()
    adapter.remove()
    twin_p = dict(twin.named_parameters())
    moved = 0
    for n, p in model.named_parameters():
        new_free = twin_p[n].detach()
        if n not in region.indices:
            assert torch.equal(p.detach(), new_free), n
            continue
        idx = region.indices[n].long()
        o = old[n].reshape(-1)[idx]
        delta = (new_free.reshape(-1)[idx] - o) * alpha
        if max_update is not None:
            delta = delta.clamp(-max_update, max_update)
        torch.testing.assert_close(p.detach().reshape(-1)[idx], o + delta, rtol=0, atol=1e-7)
        mask = ~region.mask(n).reshape(-1)
        assert torch.equal(p.detach().reshape(-1)[mask], new_free.reshape(-1)[mask])
        moved += int((new_free.reshape(-1)[idx] != o).sum())
    assert moved > 0


def test_trainer_callback_bit_identical(tmp_path, arch):
    model = tiny_model(arch)
    region = top_region(model, 0.05)
    region.save(tmp_path / "r.safetensors")
    before_region = region_values(model, region)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = FreezeRegionCallback(FreezeRegionConfig(region=str(tmp_path / "r.safetensors")))
    trainer = make_trainer(model, tmp_path / "out", [cb], bf16=(arch == "llama"))
    out = trainer.train()
    assert out.global_step == 4
    after = region_values(model, region)
    for n in before_region:
        assert torch.equal(after[n], before_region[n]), n
    assert outside_changed(model, before, region) > 0.9
    assert cb.adapter._handles == []  # hooks removed at on_train_end


def test_config_roundtrip_and_validation(tmp_path):
    model = tiny_model("llama")
    region = top_region(model, 0.05)
    region.save(tmp_path / "r.safetensors")
    cfg = FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), alpha=0.25, max_update=1e-3)
    cfg.save_pretrained(tmp_path / "adapter")
    doc = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert doc["region"] == "region.safetensors" and doc["alpha"] == 0.25
    back = FreezeRegionConfig.from_pretrained(tmp_path / "adapter")
    assert (back.alpha, back.max_update, back.mask_grads) == (0.25, 1e-3, False)
    adapter = FreezeRegionAdapter(model, back)
    assert adapter.region.counts() == region.counts()
    adapter.remove()
    for bad in [dict(alpha=1.5), dict(alpha=-0.1), dict(alpha="x"), dict(max_update=0),
                dict(max_update=-1.0), dict(region="")]:
        kw = {"region": str(tmp_path / "r.safetensors"), **bad}
        with pytest.raises(RegionsError) as e:
            FreezeRegionConfig(**kw)
        key = next(iter(bad))
        assert key in str(e.value) or repr(bad[key]) in str(e.value)
    with pytest.raises(RegionsError, match="freeze_region_config.json"):
        FreezeRegionConfig.from_pretrained(tmp_path)
    with pytest.raises(RegionsError, match=r"init 'zeros' is not one of \('keep', 'zero'\)"):
        FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), init="zeros")
    zero = FreezeRegionConfig(region=str(tmp_path / "r.safetensors"), init="zero")
    zero.save_pretrained(tmp_path / "zero")
    assert json.loads((tmp_path / "zero" / CONFIG_NAME).read_text())["init"] == "zero"
    assert FreezeRegionConfig.from_pretrained(tmp_path / "zero").init == "zero"
    old = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    del old["init"]  # a config saved before init existed
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(old))
    assert back.init == FreezeRegionConfig.from_pretrained(tmp_path / "adapter").init == "keep"


def test_region_for_another_model_is_rejected(tmp_path):
    region = top_region(tiny_model("llama"), 0.05)
    region.save(tmp_path / "r.safetensors")
    with pytest.raises(RegionsError, match="another model"):
        FreezeRegionAdapter(tiny_model("bloom"), str(tmp_path / "r.safetensors"))


def test_memory_is_proportional_to_region():
    model = tiny_model("llama")
    for ratio in (0.01, 0.05, 0.2):
        region = top_region(model, ratio)
        with FreezeRegionAdapter(model, region) as a:
            mem = a.memory_bytes()
        k = region.numel()
        assert mem["entries"] == k
        assert mem["indices"] == 8 * k and mem["values"] == 4 * k
