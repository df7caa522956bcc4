"""Neuron metrics (paper 2) on synthetic activations with planted structure, neuron sets and
their hooks on tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from lmeval_regions.activations import Activations
from lmeval_regions.models import find_layout
from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError
from lmeval_regions.neurons import NeuronSet
from lmeval_regions import neurons as N

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
    key = N.key_neurons(acts, threshold=2.0)
    for lang in LANGS:
        assert torch.equal(key.masks[lang], plant[lang]), lang
    assert key.sklr == 2 * len(LANGS)
    assert key.layer_distribution()["ar"] == [1, 1]
    # a threshold above the maximal z (sqrt(n_lang - 1)) selects nothing
    assert N.key_neurons(acts, threshold=(len(LANGS) - 1) ** 0.5 + 0.01).sklr == 0


def test_contribution_is_share_of_mean_pairwise_cosine():
    acts, _ = planted()
    c = N.contribution_scores(acts)
    v = N.vectors(acts)
    x = v[: N_MEAN]  # first language
    sims = [float(x[i] @ x[j]) for i in range(N_MEAN) for j in range(i + 1, N_MEAN)]
    assert float(c[0].sum()) == pytest.approx(sum(sims) / len(sims), rel=1e-5)


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
    sel = N.lape(acts, top_rate=2 * len(LANGS) / (N_LAYERS * N_NEUR), filter_rate=0.9,
                 activation_bar_ratio=0.9)
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
                          torch.tensor([lay.intermediate_size + 3, lay.intermediate_size + 5]) / 100)
    other = tiny_model("llama") if lay.down_proj[0].startswith("transformer") else tiny_model("bloom")
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
