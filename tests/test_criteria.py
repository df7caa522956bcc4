"""Importance criteria (sum_abs default, abs_sum, fisher, magnitude, wanda), several in one pass,
cumulative snapshots, merged passes, and old artefacts, on tiny models built from configs."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_model

from lmeval_regions.artefacts import model_fingerprint, save_artefact
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import (
    CRITERIA,
    Importance,
    ImportanceConfig,
    ImportancePass,
    compute_importance,
    iter_importances,
)
from lmeval_regions.models import block_parameters
from lmeval_regions.regions import Region, select_file, select_from_importance


def grads_of(model, loss, names):
    params = dict(model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


def direct_scores(model, batches, names):
    """Every criterion computed directly, in fp64, without the library's accumulators:
    sum_abs from ONE autograd.grad of the corpus loss Σ_b L_b; abs_sum/fisher from per-batch
    grads; wanda from the stored inputs of every Linear (masked, then a column norm)."""
    params = dict(model.named_parameters())
    theta = {n: params[n].detach().double() for n in names}
    total = sum(model(**b).loss for b in batches)  # L(D) = Σ_b L_b, paper 1 / the release
    g_all = grads_of(model, total, names)
    out = {"sum_abs": {n: (theta[n] * g_all[n].double()).abs() for n in names},
           "abs_sum": {n: torch.zeros_like(theta[n]) for n in names},
           "fisher": {n: torch.zeros_like(theta[n]) for n in names},
           "magnitude": {n: theta[n].abs() for n in names}}
    for b in batches:
        g = grads_of(model, model(**b).loss, names)
        for n in names:
            out["abs_sum"][n] += (theta[n] * g[n].double()).abs()
            out["fisher"][n] += g[n].double() ** 2
    inputs = {n: [] for n in names}
    handles = []
    for n in names:
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=n: inputs[n].append(a[0].detach().double())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    out["wanda"] = {}
    for n in names:
        rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs[n], batches)])
        norm = torch.linalg.vector_norm(rows, dim=0)  # ‖X_j‖ over non-pad tokens
        out["wanda"][n] = theta[n].abs() * norm[None, :]
    return out


def test_each_criterion_equals_a_direct_computation_in_one_pass(model):
    batches = random_batches(n=3)
    names = sorted(block_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = list(iter_importances(model, batches, ImportanceConfig(criteria=CRITERIA),
                                progress=False))
    for n, p in model.named_parameters():  # no weight moves, flags come back
        assert torch.equal(p, before[n]) and p.requires_grad and p.grad is None
    assert [i.criterion for i in got] == list(CRITERIA)
    ref = direct_scores(model, batches, names)
    for imp in got:
        assert sorted(imp.scores) == names and imp.snapshot is None
        assert imp.n_sequences == 6 and imp.extra["batch_size"] == 2
        for n in names:
            torch.testing.assert_close(imp.scores[n].double(), ref[imp.criterion][n],
                                       rtol=1e-4, atol=1e-10, msg=f"{imp.criterion} {n}")


def test_default_is_the_papers_estimator(model):
    """ImportanceConfig() = sum_abs = |θ·∇L(D)| with L(D) the summed batch losses."""
    batches = random_batches(n=3)
    imp = compute_importance(model, batches, progress=False)
    assert imp.criterion == "sum_abs"
    names = sorted(imp.scores)
    params = dict(model.named_parameters())
    g = grads_of(model, sum(model(**b).loss for b in batches), names)
    for n in names:
        ref = (params[n].detach().double() * g[n].double()).abs()
        torch.testing.assert_close(imp.scores[n].double(), ref, rtol=1e-4, atol=1e-10)


def test_one_pass_equals_one_criterion_per_pass():
    model = tiny_model("llama")
    batches = random_batches(n=2)
    together = {i.criterion: i for i in iter_importances(
        model, batches, ImportanceConfig(criteria=CRITERIA), progress=False)}
    for c in CRITERIA:
        alone = compute_importance(model, batches, ImportanceConfig(criteria=(c,)),
                                   progress=False)
        for n in alone.scores:  # same forward/backward, same arithmetic: bit-exact
            assert torch.equal(alone.scores[n], together[c].scores[n]), (c, n)


def test_batch_size_dependence_of_abs_sum_not_sum_abs():
    """Equal-length sequences without padding: cutting 4 sequences into batches of 1 or of 2
    scales Σ_b g_b by 2 (mean losses), so sum_abs ranks alike; abs_sum does not."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (4, 10), generator=g)
    cut = {bs: [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs]),
                 "labels": ids[i:i + bs]} for i in range(0, 4, bs)] for bs in (1, 2)}
    cfg = ImportanceConfig(criteria=("sum_abs", "abs_sum"))
    r = {bs: {i.criterion: i for i in iter_importances(model, b, cfg, progress=False)}
         for bs, b in cut.items()}
    assert r[1]["sum_abs"].extra["batch_size"] == 1 and r[2]["sum_abs"].extra["batch_size"] == 2
    for n in r[1]["sum_abs"].scores:
        torch.testing.assert_close(r[1]["sum_abs"].scores[n], 2 * r[2]["sum_abs"].scores[n],
                                   rtol=1e-4, atol=1e-9)
    far = [float(((r[1]["abs_sum"].scores[n] - 2 * r[2]["abs_sum"].scores[n]).norm()
                  / r[1]["abs_sum"].scores[n].norm())) for n in r[1]["abs_sum"].scores]
    assert min(far) > 1e-2  # a real difference in every matrix, not rounding


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_snapshots_equal_separate_runs_over_prefixes(arch):
    model = tiny_model(arch)
    batches = random_batches(n=4)  # 2 sequences each
    cfg = ImportanceConfig(criteria=("sum_abs", "fisher", "wanda"), snapshots=(2, 3))
    got = list(iter_importances(model, batches, cfg, languages=["xx"], progress=False))
    # count 2: after batch 1; count 3: after batch 2 (first batch reaching it, as the release)
    assert [(i.snapshot, i.criterion) for i in got] == [
        (2, "sum_abs"), (2, "fisher"), (2, "wanda"), (3, "sum_abs"), (3, "fisher"),
        (3, "wanda"), (None, "sum_abs"), (None, "fisher"), (None, "wanda")]
    for imp in got:
        n_batches = {2: 1, 3: 2, None: 4}[imp.snapshot]
        ref = compute_importance(model, batches[:n_batches],
                                 ImportanceConfig(criteria=(imp.criterion,)), progress=False)
        assert imp.n_sequences == ref.n_sequences == 2 * n_batches
        assert imp.n_tokens == ref.n_tokens and imp.languages == ["xx"]
        for n in ref.scores:  # the same arithmetic in the same order: bit-exact
            assert torch.equal(imp.scores[n], ref.scores[n]), (imp.snapshot, imp.criterion, n)


def test_snapshot_beyond_the_corpus_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(RegionsError, match="snapshot at 7 sequences, but the corpus has 6"):
        list(iter_importances(model, random_batches(n=3), ImportanceConfig(snapshots=(7,)),
                              progress=False))
    with pytest.raises(RegionsError, match=r"snapshots \[7\] were not reached: .* 6 sequences"):
        list(iter_importances(model, iter(random_batches(n=3)),
                              ImportanceConfig(snapshots=(7,)), progress=False))
    with pytest.raises(RegionsError, match="use iter_importances"):
        compute_importance(model, random_batches(n=1), ImportanceConfig(snapshots=(1,)))
    for p in model.parameters():  # flags restored after the error inside the pass
        assert p.requires_grad and p.grad is None


def test_merged_passes_equal_one_pass_over_both():
    """PassState sums add: two passes over disjoint halves = one pass over the whole (with the
    same batches), for every criterion."""
    model = tiny_model("gemma3")
    batches = random_batches(n=4)
    cfg = ImportanceConfig(criteria=CRITERIA)
    with ImportancePass(model, cfg) as run:
        for b in batches[:2]:
            run.step(b)
        a = run.state()
        run.reset()
        for b in batches[2:]:
            run.step(b)
        merged = run.finish(a + run.state())
    whole = list(iter_importances(model, batches, cfg, progress=False))
    for m, w in zip(merged, whole):
        assert m.criterion == w.criterion and m.n_sequences == w.n_sequences == 8
        assert m.n_tokens == w.n_tokens
        for n in w.scores:
            # the two sums add the same fp32 terms in another order: where sum_abs's gradient
            # sum cancels to ~0 the relative error is unbounded, so the absolute tolerance is a
            # fraction of the matrix's largest score (the standard of the release comparison)
            scale = float(w.scores[n].abs().max())
            torch.testing.assert_close(m.scores[n], w.scores[n], rtol=1e-5, atol=1e-6 * scale)


def test_wanda_on_gpt2_conv1d_orientation():
    """GPT-2's Conv1D stores W[in, out]: the input norms scale rows, not columns."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    batches = random_batches(n=2)
    imp = compute_importance(model, batches, ImportanceConfig(criteria=("wanda",)),
                             progress=False)
    name = "transformer.h.0.mlp.c_proj.weight"  # Conv1D [128 in, 32 out]
    w = model.get_parameter(name).detach()
    seen = []
    h = model.get_submodule(name.rsplit(".", 1)[0]).register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])
    ref = w.abs() * torch.linalg.vector_norm(rows.double(), dim=0).float()[:, None]
    assert w.shape[0] == 128 and imp.scores[name].shape == w.shape
    torch.testing.assert_close(imp.scores[name], ref, rtol=1e-5, atol=1e-8)


def test_wanda_refuses_what_it_cannot_score(model):
    with pytest.raises(RegionsError, match="2-D weights of linear layers.*include_norms"):
        ImportancePass(model, ImportanceConfig(criteria=("wanda",), include_norms=True))
    emb = [n for n, p in model.named_parameters() if "emb" in n or "wte" in n][0]
    with pytest.raises(RegionsError, match=f"'{emb}' belongs to [A-Za-z0-9]*Embedding"):
        ImportancePass(model, ImportanceConfig(criteria=("wanda",), include=(emb,)))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_artefact_works_with_selection(tmp_path, criterion):
    model = tiny_model("llama")
    imp = compute_importance(model, random_batches(n=2), ImportanceConfig(criteria=(criterion,)),
                             languages=["xx"], progress=False)
    imp.save(tmp_path / "imp.safetensors")
    loaded = Importance.load(tmp_path / "imp.safetensors", model)
    assert loaded.criterion == criterion and loaded.mode == criterion
    assert loaded.extra["batch_size"] == 2
    a = select_from_importance(loaded, "top", 0.05)
    b = select_file(tmp_path / "imp.safetensors", "top", 0.05)
    assert a.spec["source"]["criterion"] == b.spec["source"]["criterion"] == criterion
    for n in a.indices:
        assert torch.equal(a.indices[n], b.indices[n])
        k = a.indices[n].numel()  # the top entries by a plain sort of this criterion's scores
        ref = torch.sort(loaded.scores[n].reshape(-1), descending=True, stable=True).indices[:k]
        assert sorted(ref.tolist()) == a.indices[n].tolist()
    a.save(tmp_path / "r.safetensors")
    assert Region.load(tmp_path / "r.safetensors", model).numel() == a.numel()


def test_artefact_written_with_mode_loads_as_criterion(tmp_path):
    """Files from before criteria existed said `mode`; they load with the same meaning."""
    model = tiny_model("llama")
    scores = {n: p.detach().abs() for n, p in block_parameters(model).items()}
    save_artefact(tmp_path / "old.safetensors", scores, "importance",
                  {"mode": "abs_sum", "model": model_fingerprint(model), "languages": ["en"]})
    old = Importance.load(tmp_path / "old.safetensors", model)
    assert old.criterion == "abs_sum" and old.snapshot is None and "mode" not in old.extra
    r = select_file(tmp_path / "old.safetensors", "top", 0.1)
    assert r.spec["source"]["criterion"] == "abs_sum"


def test_closing_the_generator_early_restores_the_model():
    model = tiny_model("llama").train()
    gen = iter_importances(model, random_batches(n=3), ImportanceConfig(snapshots=(2,)),
                           progress=False)
    first = next(gen)  # suspended inside the pass: eval mode, only block weights need grads
    assert first.snapshot == 2 and not model.training
    assert not model.get_parameter("model.embed_tokens.weight").requires_grad
    gen.close()
    assert model.training and all(p.requires_grad and p.grad is None
                                  for p in model.parameters())
