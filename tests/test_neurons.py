"""Neuron metrics (paper 2) on synthetic activations with planted structure, neuron sets and
their hooks on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from lmeval_regions import neurons as N
from lmeval_regions.activations import ACT_SITE, SITE, Activations
from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError
from lmeval_regions.models import find_layout
from lmeval_regions.neurons import NeuronAnalysisConfig, NeuronMode, NeuronSet

LANGS = ["ar", "zh", "en", "fr", "es", "ru", "hi", "vi"]
N_MEAN, N_LAYERS, N_NEUR = 6, 2, 20


def planted(lang_strength=3.0, meaning_strength=1.0, seed=0):
    """Samples = languages x meanings. Every neuron has a base activation 1; language l lifts
    neuron l of layer 0 and neuron l of layer 1 by ``lang_strength``; meaning m adds a fixed
    random vector (shared by all languages) on neurons 10..19. Deterministic: neurons outside
    the planted ones are exactly equal across languages."""
    g = torch.Generator().manual_seed(seed)
    meaning_vecs = torch.rand(N_MEAN, N_LAYERS, 10, generator=g) * meaning_strength
    xs, langs, ids = [], [], []
    plant = {}
    for li, lang in enumerate(LANGS):
        m = torch.zeros(N_LAYERS, N_NEUR, dtype=torch.bool)
        m[:, li] = True
        plant[lang] = m
        for mi in range(N_MEAN):
            x = torch.ones(N_LAYERS, N_NEUR)
            x[:, li] += lang_strength
            x[:, 10:] += meaning_vecs[mi]
            xs.append(x)
            langs.append(lang)
            ids.append(f"u{mi}")
    return Activations.from_tensor(torch.stack(xs), langs, ids), plant


def test_lrds_sads_signs_on_planted_structure():
    acts, _ = planted()
    r = N.lrds_sads(N.similarity(acts), acts.langs, acts.ids)
    assert r["lrds"] > 0.01 and r["sads"] > 0.01
    # no language structure -> LRDS 0, meaning structure stays
    flat, _ = planted(lang_strength=0.0)
    r0 = N.lrds_sads(N.similarity(flat), flat.langs, flat.ids)
    assert abs(r0["lrds"]) < 1e-6 and r0["sads"] > 0.01
    # no meaning structure -> SADS 0, language structure stays
    nomean, _ = planted(meaning_strength=0.0)
    r1 = N.lrds_sads(N.similarity(nomean), nomean.langs, nomean.ids)
    assert abs(r1["sads"]) < 1e-6 and r1["lrds"] > 0.01


def test_sads_groups_by_labels_not_positions():
    """Pairs are grouped by (language, unit id): shuffling the sample order changes nothing
    (the released code regrouped by position with a stride of n_per_lang+1)."""
    acts, _ = planted()
    perm = torch.randperm(len(acts.langs), generator=torch.Generator().manual_seed(1))
    shuf = Activations.from_tensor(acts.mean[perm], [acts.langs[i] for i in perm],
                                   [acts.ids[i] for i in perm])
    a = N.lrds_sads(N.similarity(acts), acts.langs, acts.ids)
    b = N.lrds_sads(N.similarity(shuf), shuf.langs, shuf.ids)
    assert a["lrds"] == pytest.approx(b["lrds"], abs=1e-6)
    assert a["sads"] == pytest.approx(b["sads"], abs=1e-6)
    m = N.pair_masks(["a", "a", "b", "b"], ["1", "2", "2", "1"])
    # same meaning, different language: (0,3), (1,2) and their mirrors
    assert m["same_meaning_diff_lang"].nonzero().tolist() == [[0, 3], [1, 2], [2, 1], [3, 0]]


def test_layerwise_and_block_means():
    acts, _ = planted()
    per = N.layerwise(acts)
    assert [p["layer"] for p in per] == [0, 1]
    assert all(p["lrds"] > 0 and p["sads"] > 0 for p in per)
    langs, blocks = N.language_block_means(N.similarity(acts), acts.langs)
    assert langs == LANGS
    # same-language blocks are the most similar in every row
    assert all(int(blocks[i].argmax()) == i for i in range(len(LANGS)))


def test_key_neurons_recover_planted_sets():
    acts, plant = planted()
    key = N.key_neurons(acts, NeuronAnalysisConfig(threshold=2.0))
    for lang in LANGS:
        assert torch.equal(key.masks[lang], plant[lang]), lang
    assert key.sklr == 2 * len(LANGS)
    assert key.layer_distribution()["ar"] == [1, 1]
    # a threshold above the maximal z (sqrt(n_lang - 1)) selects nothing
    top = NeuronAnalysisConfig(threshold=(len(LANGS) - 1) ** 0.5 + 0.01)
    assert N.key_neurons(acts, top).sklr == 0


def test_contribution_is_share_of_mean_pairwise_cosine():
    acts, _ = planted()
    c = N.contribution_scores(acts, eps=0.0)
    v = N.vectors(acts)
    x = v[: N_MEAN]  # first language
    sims = [float(x[i] @ x[j]) for i in range(N_MEAN) for j in range(i + 1, N_MEAN)]
    assert float(c[0].sum()) == pytest.approx(sum(sims) / len(sims), rel=1e-5)


def _direct_contributions(acts, eps):
    """Paper 2 release's recipe, loop by loop: each sample's vector over all layers divided by
    its L2 norm, plus eps; per language the mean over pairs i<j of the products."""
    flat = acts.mean.reshape(len(acts.langs), -1).double()
    rows = []
    for lang in acts.languages:
        hs = [flat[i] / torch.linalg.vector_norm(flat[i]) + eps
              for i, l in enumerate(acts.langs) if l == lang]
        prods = [hs[i] * hs[j] for i in range(len(hs)) for j in range(i + 1, len(hs))]
        rows.append(torch.stack(prods).mean(0))
    return torch.stack(rows)


def test_contribution_eps_equals_direct_computation():
    acts = Activations.from_tensor(torch.randn(3 * 4, 2, 5, generator=torch.Generator()
                                               .manual_seed(4)), ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
                                   [f"u{i % 4}" for i in range(12)])
    for eps in (0.0, 1e-5, 0.3):
        want = _direct_contributions(acts, eps)
        assert torch.allclose(N.contribution_scores(acts, eps).double(), want, rtol=1e-5,
                              atol=1e-9), eps
    assert N.ZSCORE_EPS == 1e-5 and NeuronAnalysisConfig().eps == N.ZSCORE_EPS
    # the default is the release's: z-scores follow the eps contributions
    z = N.key_neurons(acts).z.reshape(3, -1).double()
    c = _direct_contributions(acts, 1e-5)
    want_z = (c - c.mean(0)) / c.std(0, unbiased=False)
    assert torch.allclose(z, want_z, atol=1e-4)
    assert not torch.allclose(N.contribution_scores(acts, 0.3), N.contribution_scores(acts, 0.0))


def test_key_neurons_by_percentile():
    acts, plant = planted()
    # 2 planted neurons of 40 per language: the top 5% of each language's z-scores
    key = N.key_neurons(acts, NeuronAnalysisConfig(percentile=2 / (N_LAYERS * N_NEUR)))
    for lang in LANGS:
        assert torch.equal(key.masks[lang], plant[lang]), lang
    assert key.percentile == 0.05 and set(key.cutoffs) == set(LANGS)
    # against numpy's percentile (linear interpolation) of each language's z, strictly above
    import numpy as np

    g = torch.Generator().manual_seed(5)
    rnd = Activations.from_tensor(torch.rand(4 * 5, 3, 7, generator=g),
                                  [l for l in "abcd" for _ in range(5)],
                                  [f"u{i}" for _ in range(4) for i in range(5)])
    for p in (0.1, 0.25, 0.5):
        k = N.key_neurons(rnd, NeuronAnalysisConfig(percentile=p))
        for i, lang in enumerate(rnd.languages):
            zl = k.z[i].double().numpy()
            cut = np.percentile(zl, 100 * (1 - p))
            assert k.cutoffs[lang] == pytest.approx(cut, rel=1e-12, abs=1e-12)
            assert np.array_equal(k.masks[lang].numpy(), zl > cut), (p, lang)
    for bad in (0.0, 1.0, 2.0, -0.1):
        with pytest.raises(RegionsError, match="percentile"):
            NeuronAnalysisConfig(percentile=bad)


def test_analysis_config_validation():
    for kwargs, match in (({"threshold": float("nan")}, "threshold"), ({"eps": -1e-5}, "eps"),
                          ({"top_rate": 0.0}, "top_rate"), ({"filter_rate": 1.0}, "filter_rate"),
                          ({"activation_bar_ratio": 1.5}, "activation_bar_ratio"),
                          ({"seed": -1}, "seed")):
        with pytest.raises(RegionsError, match=match):
            NeuronAnalysisConfig(**kwargs)
    acts, _ = planted()
    with pytest.raises(RegionsError, match="NeuronAnalysisConfig"):
        N.key_neurons(acts, 2.0)


def _sort_quantile(s, q):
    """Exact quantile of the sorted values ``s`` (linear interpolation at rank q * (n - 1))."""
    s = s.double()
    rank = q * (s.numel() - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return float(s[lo] + (s[hi] - s[lo]) * (rank - lo))


def test_quantile_equals_torch_quantile_on_small_inputs():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.rand(101, generator=g, dtype=torch.float64),
              torch.randn(7, 13, generator=g, dtype=torch.float64),
              torch.randint(0, 5, (50,), generator=g).double(),  # ties
              torch.tensor([3.0], dtype=torch.float64)]
    for x in inputs:
        for q in (0.0, 0.01, 1 / 3, 0.5, 0.95, 0.999, 1.0):
            assert N.quantile(x, q) == torch.quantile(x.flatten(), q).item(), (x.shape, q)
    x32 = torch.rand(1000, generator=g)
    for q in (0.05, 0.95):
        assert N.quantile(x32, q) == torch.quantile(x32.double(), q).item()
    # repeated values around the rank, and integers
    rep = torch.tensor([1.0, 2.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    for q in (0.1, 0.3, 0.6, 0.8, 0.9):
        assert N.quantile(rep, q) == torch.quantile(rep, q).item(), q
    assert N.quantile(torch.arange(10), 0.25) == 2.25
    with pytest.raises(RegionsError, match="NaN"):
        N.quantile(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(RegionsError, match=r"\[0, 1\]"):
        N.quantile(x32, 1.5)


def test_quantile_and_lape_beyond_torch_quantile_limit():
    """17M values (> 2^24, where torch.quantile refuses): thresholds equal an exact sort, and
    LAPE on a statistic of that size recovers planted language-specific neurons."""
    g = torch.Generator().manual_seed(1)
    n_lang, n_layer, n_neur = 8, 16, 133_000  # 17.0M probabilities
    probs = torch.rand(n_lang, n_layer, n_neur, generator=g)
    assert probs.numel() > 2 ** 24
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(probs.flatten(), 0.95)
    s = probs.flatten().sort().values
    for q in (0.01, 0.5, 0.95):
        assert N.quantile(probs, q) == _sort_quantile(s, q), q
    del s
    # neuron (layer l, index 1000 * j) fires only for language j: entropy 0, p above every bar
    plant = {}
    for j in range(n_lang):
        probs[:, j % n_layer, 1000 * j] = 0.0
        probs[j, j % n_layer, 1000 * j] = 0.999
        plant[j] = (j % n_layer, 1000 * j)
    cfg = NeuronAnalysisConfig(top_rate=n_lang / (n_layer * n_neur))
    sel = N.lape_neurons(probs, [f"l{j}" for j in range(n_lang)], cfg)
    for j in range(n_lang):
        m = sel[f"l{j}"]
        assert m.shape == (n_layer, n_neur) and int(m.sum()) == 1 and bool(m[plant[j]]), j


def test_random_baseline_matches_size_and_layers():
    _, plant = planted()
    rnd = N.random_like(plant, seed=3)
    for lang in LANGS:
        assert rnd[lang].sum(1).tolist() == plant[lang].sum(1).tolist()
    assert any(not torch.equal(rnd[l], plant[l]) for l in LANGS)
    assert torch.equal(N.random_like(plant, seed=3)["ar"], rnd["ar"])


def test_lape_finds_planted_language_specific_neurons():
    acts, plant = planted()
    active = torch.full_like(acts.mean, 0.3)
    for i, lang in enumerate(acts.langs):
        active[i][plant[lang]] = 0.9
    acts.active = active
    sel = N.lape(acts, NeuronAnalysisConfig(top_rate=2 * len(LANGS) / (N_LAYERS * N_NEUR),
                                            filter_rate=0.9, activation_bar_ratio=0.9))
    for lang in LANGS:
        assert torch.equal(sel[lang], plant[lang]), lang
    acts.active = None
    with pytest.raises(RegionsError, match="active=True"):
        N.lape(acts)


def test_deactivation_table_summary():
    base = {"a": 10.0, "b": 20.0, "c": 5.0}
    bump = {("a", "a"): 2.0, ("a", "b"): 1.1, ("a", "c"): 1.0,
            ("b", "a"): 1.5, ("b", "b"): 1.2, ("b", "c"): 1.0}

    def ppl(row, lang):
        return base[lang] * (1 if row is None else bump[(row, lang)])

    t = N.deactivation_table(ppl, ["a", "b"], ["a", "b", "c"])
    assert t["change"]["a"]["a"] == pytest.approx(1.0)
    s = t["summary"]
    assert s["rows_compared"] == 2 and s["diagonal_exceeds_count"] == 1
    assert s["per_row"]["b"]["diagonal_exceeds"] is False  # 0.2 < (0.5 + 0) / 2
    assert s["per_row"]["b"]["mean_off_diagonal"] == pytest.approx(0.25)


# ---- NeuronSet ------------------------------------------------------------------------------

def _pre_hooks(model):
    return {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}


def _set(model, neurons=(3, 5)):
    lay = find_layout(model)
    mask = torch.zeros(lay.num_layers, lay.intermediate_size, dtype=torch.bool)
    mask[:, list(neurons)] = True
    means = torch.arange(lay.num_layers * lay.intermediate_size, dtype=torch.float32
                         ).reshape(lay.num_layers, -1) / 100
    return NeuronSet.from_masks({"ar": mask, "random": ~mask}, model, means={"ar": means},
                                method="test", threshold=2.0), lay


def test_neuron_set_roundtrip_and_fingerprint(model, tmp_path):
    ns, lay = _set(model)
    p = tmp_path / "n.safetensors"
    ns.save(p)
    back = NeuronSet.load(p, model)
    assert back.sets == ["ar", "random"] and back.method == "test" and back.threshold == 2.0
    assert back.counts("ar") == {m: 2 for m in lay.down_proj}
    assert back.indices["ar"][lay.down_proj[0]].dtype == torch.int32
    assert torch.allclose(back.means["ar"][lay.down_proj[1]],
                          torch.tensor([lay.intermediate_size + 3,
                                        lay.intermediate_size + 5]) / 100)
    other = (tiny_model("llama") if lay.down_proj[0].startswith("transformer")
             else tiny_model("bloom"))
    with pytest.raises(ModelMismatchError):
        NeuronSet.load(p, other)
    with pytest.raises(RegionsError, match="did you mean|Did you mean"):
        back.counts("ra")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ArtefactError):
        NeuronSet.load(bad)


def test_intervene_modes_change_exactly_the_selected_channels(model):
    ns, lay = _set(model)
    seen = {}

    def spy(module, args):
        seen["x"] = args[0].detach().clone()

    target = dict(model.named_modules())[lay.down_proj[0]]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    # the spy is registered first, so it sees the input before the neuron hooks edit it...
    h = target.register_forward_pre_hook(spy)
    with torch.no_grad():
        model(ids)
        clean = seen["x"]
        h.remove()
        # ...and registered after them, it sees the edited input
        for mode, expect in (("zero", 0.0), ("scale:3", "x3"), ("mean", "mean")):
            with ns.intervene(model, "ar", mode):
                h = target.register_forward_pre_hook(spy)
                try:
                    model(ids)
                finally:
                    h.remove()
            got = seen["x"]
            keep = [i for i in range(lay.intermediate_size) if i not in (3, 5)]
            assert torch.equal(got[..., keep], clean[..., keep])
            if expect == 0.0:
                assert torch.all(got[..., [3, 5]] == 0)
            elif expect == "x3":
                assert torch.allclose(got[..., [3, 5]], clean[..., [3, 5]] * 3)
            else:
                assert torch.allclose(got[..., 3], torch.full_like(got[..., 3], 0.03))
    with pytest.raises(RegionsError, match="no stored means"):
        ns.intervene(model, "random", "mean")
    with pytest.raises(RegionsError, match="not one of"):
        ns.intervene(model, "ar", "zap")


def test_intervene_removes_exactly_its_hooks_also_on_error(model):
    ns, lay = _set(model)
    target = dict(model.named_modules())[lay.down_proj[1]]
    keep = target.register_forward_pre_hook(lambda m, a: None)  # someone else's hook
    before = _pre_hooks(model)
    ids = torch.randint(0, 128, (1, 5))
    with pytest.raises(RuntimeError, match="boom"):
        with ns.intervene(model, ["ar", "random"], "zero"):
            assert _pre_hooks(model) != before
            model(ids)
            raise RuntimeError("boom")
    assert _pre_hooks(model) == before
    h = ns.intervene(model, "ar", "scale:0.5")
    h.remove()
    h.remove()  # idempotent
    assert _pre_hooks(model) == before
    keep.remove()


def test_zeroing_changes_output_and_restores(model):
    ns, _ = _set(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(ids).logits
        with ns.intervene(model, "ar", "zero"):
            z = model(ids).logits
        with ns.intervene(model, "ar", "scale:1"):
            one = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(base, z)
    assert torch.equal(base, one) and torch.equal(base, after)


def test_neuron_set_validation(model):
    lay = find_layout(model)
    with pytest.raises(RegionsError, match="twice"):
        NeuronSet({"ar": {lay.down_proj[0]: torch.tensor([1, 1])}})
    with pytest.raises(RegionsError, match="outside"):
        NeuronSet({"ar": {lay.down_proj[0]: torch.tensor([999])}},
                   intermediate_size=lay.intermediate_size)
    with pytest.raises(RegionsError, match="without '/'"):
        NeuronSet({"a/b": {}})
    with pytest.raises(RegionsError, match="shape"):
        NeuronSet.from_masks({"ar": torch.zeros(3, 3, dtype=torch.bool)}, model)
    ns = NeuronSet({"ar": {"model.nope.down_proj": torch.tensor([1])}})
    with pytest.raises(RegionsError, match="not a down projection"):
        ns.intervene(model, "ar")


def test_neuron_mode_parse_noise():
    m = NeuronMode.parse("noise:0.1")
    assert (m.kind, m.value, m.seed) == ("noise", 0.1, 0) and str(m) == "noise:0.1/0"
    m = NeuronMode.parse("noise:0.25/7")
    assert (m.value, m.seed) == (0.25, 7) and NeuronMode.parse(str(m)) == m
    assert str(NeuronMode.parse("scale:0.5")) == "scale:0.5"
    assert NeuronMode.parse("zero").seed is None
    for bad, match in (("noise", "needs a value"), ("noise:-1", ">= 0"), ("noise:0.1/x", "seed"),
                       ("noise:0.1/-2", "seed"), ("noise:inf", "finite"), ("zero:1", "takes no"),
                       ("scale:0.5/3", "not a number"), ("nois:0.1", "Did you mean")):
        with pytest.raises(RegionsError, match=match):
            NeuronMode.parse(bad)


def test_noise_adds_exactly_the_seeded_noise_to_selected_channels(model):
    """Spies before and after the neuron hooks on every down projection see, in one forward,
    the input and the edited input: the difference is the documented seeded draw (one CPU
    generator seeded with SEED, (batch, seq, k) fp32 normals per layer in layer order, times
    STD) on the selected channels, and nothing elsewhere; the hooks go away on exit."""
    ns, lay = _set(model)
    sel = [3, 5]
    keep = [i for i in range(lay.intermediate_size) if i not in sel]
    mods = dict(model.named_modules())
    before_hooks = _pre_hooks(model)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    std, seed = 0.5, 11

    def run(mode):
        seen, handles = {}, []
        for i, n in enumerate(lay.down_proj):
            handles.append(mods[n].register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(("in", i), a[0].detach().clone())))
        try:
            with ns.intervene(model, "ar", mode):
                for i, n in enumerate(lay.down_proj):
                    handles.append(mods[n].register_forward_pre_hook(
                        lambda m, a, i=i: seen.__setitem__(("out", i), a[0].detach().clone())))
                with torch.no_grad():
                    model(ids)
        finally:
            for h in handles:
                h.remove()
        return seen

    seen = run(f"noise:{std}/{seed}")
    g = torch.Generator().manual_seed(seed)
    for i in range(lay.num_layers):
        x, y = seen[("in", i)], seen[("out", i)]
        noise = torch.randn((*x.shape[:-1], len(sel)), generator=g, dtype=torch.float32) * std
        assert torch.equal(y[..., keep], x[..., keep]), i
        assert torch.equal(y[..., sel], x[..., sel] + noise.to(x.dtype)), i
    assert _pre_hooks(model) == before_hooks
    # same seed, same noise; another seed, other noise
    again, other = run(f"noise:{std}/{seed}"), run(f"noise:{std}/{seed + 1}")
    assert torch.equal(again[("out", 1)], seen[("out", 1)])
    assert not torch.equal(other[("out", 0)], seen[("out", 0)])
    assert _pre_hooks(model) == before_hooks


def test_noise_keeps_device_and_dtype(model):
    ns, lay = _set(model)
    x = torch.randn(2, 3, lay.intermediate_size, dtype=torch.bfloat16)
    target = dict(model.named_modules())[lay.down_proj[0]]
    with ns.intervene(model, "ar", "noise:0.1/2"):
        hook = next(iter(target._forward_pre_hooks.values()))
        y = hook(target, (x,))[0]
    assert y.dtype == torch.bfloat16 and y.device == x.device
    assert torch.equal(y[..., 0], x[..., 0]) and not torch.equal(y[..., 3], x[..., 3])


def test_selected_at_roundtrip_and_analyse_records_sites(tmp_path):
    """analyse() records where each set was selected (z-scores at the down projection's input,
    LAPE at the capture's active site) and the options it used; the file keeps them."""
    from lmeval_regions.studies.neuron_report import analyse

    model = tiny_model("llama")
    lay = find_layout(model)
    g = torch.Generator().manual_seed(0)
    n_s = 4
    langs = [l for l in LANGS[:6] for _ in range(n_s)]
    mean = torch.rand(len(langs), lay.num_layers, lay.intermediate_size, generator=g)
    active = torch.rand(len(langs), lay.num_layers, lay.intermediate_size, generator=g)
    acts = Activations.from_tensor(mean, langs, [f"u{i % n_s}" for i in range(len(langs))],
                                   active=active, layers=lay.down_proj, active_site=ACT_SITE)
    cfg = NeuronAnalysisConfig(percentile=0.02, top_rate=0.05, seed=3)
    result, ns = analyse(acts, model, cfg)
    assert result["config"]["percentile"] == 0.02 and result["config"]["eps"] == 1e-5
    assert result["lape_site"] == ACT_SITE
    # percentile: values strictly above rank 0.98 * 127 = 124.46 of 128 distinct z-scores
    assert all(v == 3 for v in result["key_neurons"].values())
    assert ns.selected_at == {**{l: SITE for l in LANGS[:6]},
                              **{f"lape-{l}": ACT_SITE for l in LANGS[:6]}}
    ns.save(tmp_path / "n.safetensors")
    back = NeuronSet.load(tmp_path / "n.safetensors", model)
    assert back.selected_at == ns.selected_at and back.info["config"]["seed"] == 3
    with pytest.raises(RegionsError, match="selected_at"):
        NeuronSet({"ar": {}}, selected_at={"zz": SITE})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_on_cuda_is_seeded_and_local(arch):
    model = tiny_model(arch).cuda().to(torch.bfloat16)
    ns, lay = _set(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        base = model(ids).logits
        outs = []
        for _ in range(2):
            with ns.intervene(model, "ar", "noise:0.5/4"):
                outs.append(model(ids).logits)
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], base)
