"""Activation capture on tiny llama/gemma3/bloom: pooled values equal a direct computation,
the LAPE active fraction is read at the site asked for (planted signs tell act(gate) from
act(gate)*up), the artefact streams and reloads, hooks are removed, CPU and CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.activations import (
    ACT_SITE,
    SITE,
    ActivationConfig,
    Activations,
    activation_probabilities,
    capture,
)
from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError
from lmeval_regions.models import find_layout, find_mlp_activations


class CharTokenizer:
    """Bytes -> ids < 128 after a BOS (id 1), right padding; enough for
    :func:`corpora.batches` (which asks for the ids without special tokens and adds the BOS)."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token = "\x00"

    def __call__(self, texts, return_tensors=None, padding=True, truncation=True,
                 max_length=16, padding_side="right", add_special_tokens=True, verbose=True):
        if not add_special_tokens:  # what corpora.encode asks for: plain lists, no truncation
            return {"input_ids": [[b % 127 + 1 for b in t.encode()] for t in texts]}
        ids = [[1] + [b % 127 + 1 for b in t.encode()][: max_length - 1] for t in texts]
        n = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])}


CORPUS = {
    "en": [{"id": "a", "text": "all human beings"}, {"id": "b", "text": "are born free"},
           {"id": "c", "text": "x"}],
    "fr": [{"id": "a", "text": "tous les etres humains"}, {"id": "b", "text": "naissent libres"},
           {"id": "c", "text": "y z"}],
}


def _reference(model, tok, text, max_length):
    """One text alone: mean over tokens of each down projection's input, and the fraction of
    tokens > 0 of the activation module's output and of the down projection's input."""
    lay = find_layout(model)
    act_names = find_mlp_activations(model).modules
    mods = dict(model.named_modules())
    got = {}
    hs = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: got.__setitem__(n, a[0][0].detach().float())) for n in lay.down_proj]
    hs += [mods[n].register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, o[0].detach().float())) for n in act_names]
    try:
        with torch.no_grad():
            model(**{k: v.to(next(model.parameters()).device)
                     for k, v in tok([text], max_length=max_length).items()})
    finally:
        for h in hs:
            h.remove()
    x = torch.stack([got[n] for n in lay.down_proj])  # (L, T, I)
    a = torch.stack([got[n] for n in act_names])
    return x.mean(1).cpu(), (a > 0).float().mean(1).cpu(), (x > 0).float().mean(1).cpu()


def _check_capture(model, tmp_path):
    tok = CharTokenizer()
    before = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    after = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    path = tmp_path / "acts.safetensors"
    meta = capture(model, tok, CORPUS, path, ActivationConfig(batch_size=2, max_length=12))
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == before
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == after
    lay = find_layout(model)
    assert meta["layers"] == lay.down_proj and meta["ids"]["fr"] == ["a", "b", "c"]
    assert meta["site"] == SITE and meta["active_site"] == ACT_SITE
    assert meta["active_modules"] == find_mlp_activations(model).modules
    acts = Activations.load(path)
    assert acts.active_site == ACT_SITE
    assert acts.mean.shape == (6, lay.num_layers, lay.intermediate_size)
    assert acts.langs == ["en"] * 3 + ["fr"] * 3 and acts.ids[:3] == ["a", "b", "c"]
    for i, (lang, uid) in enumerate(zip(acts.langs, acts.ids)):
        text = next(u["text"] for u in CORPUS[lang] if u["id"] == uid)
        mean, pos, _ = _reference(model, tok, text, 12)
        # batched with padding == alone: padding is excluded from the pooling
        assert torch.allclose(acts.mean[i], mean, atol=1e-5), (lang, uid)
        assert torch.allclose(acts.active[i], pos, atol=1e-6)
        assert int(acts.tokens[i]) == len(tok([text], max_length=12)["input_ids"][0])
    return acts


def test_capture_matches_direct_computation_cpu(model, tmp_path):
    acts = _check_capture(model, tmp_path)
    only_fr = Activations.load(tmp_path / "acts.safetensors", languages=["fr"])
    assert torch.equal(only_fr.mean, acts.mean[3:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda(arch, tmp_path):
    _check_capture(tiny_model(arch).cuda(), tmp_path)


def test_capture_removes_hooks_on_error(tmp_path):
    model = tiny_model("llama")
    before = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}

    class Broken(CharTokenizer):
        def __call__(self, *a, **k):
            raise RuntimeError("tokenizer broke")

    with pytest.raises(RuntimeError, match="broke"):
        capture(model, Broken(), CORPUS, tmp_path / "x.safetensors")
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == before
    assert not (tmp_path / "x.safetensors").exists()  # atomic: nothing half-written


def test_capture_bad_input_and_mismatch(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(RegionsError, match="duplicate"):
        capture(model, CharTokenizer(), {"en": [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}]},
                tmp_path / "d.safetensors")
    with pytest.raises(RegionsError, match="at least one unit"):
        capture(model, CharTokenizer(), {"en": []}, tmp_path / "e.safetensors")
    with pytest.raises(RegionsError, match="batch_size"):
        ActivationConfig(batch_size=0)
    path = tmp_path / "ok.safetensors"
    capture(model, CharTokenizer(), CORPUS, path, ActivationConfig(active=False))
    acts = Activations.load(path)
    assert acts.active is None
    with pytest.raises(ModelMismatchError):
        Activations.load(path, model=tiny_model("bloom"))
    with pytest.raises(RegionsError, match="not in"):
        Activations.load(path, languages=["de"])
    with pytest.raises(ArtefactError):
        Activations.load(tmp_path / "missing.safetensors")


def test_down_input_site_matches_direct_computation(tmp_path):
    model = tiny_model("llama")
    tok = CharTokenizer()
    path = tmp_path / "d.safetensors"
    meta = capture(model, tok, CORPUS, path, ActivationConfig(batch_size=2, max_length=12,
                                                              lape_site="down_input"))
    assert meta["active_site"] == SITE and meta["active_modules"] == find_layout(model).down_proj
    acts = Activations.load(path)
    assert acts.active_site == SITE
    for i, (lang, uid) in enumerate(zip(acts.langs, acts.ids)):
        text = next(u["text"] for u in CORPUS[lang] if u["id"] == uid)
        _, _, pos_down = _reference(model, tok, text, 12)
        assert torch.allclose(acts.active[i], pos_down, atol=1e-6)
    with pytest.raises(RegionsError, match="lape_site"):
        ActivationConfig(lape_site="gate")


def _plant_signs(model):
    """Make every MLP see the same sign pattern on every token: the residual stream is the
    token embedding (attention and MLP outputs zeroed), whose dimension 0 is 1 and dominates,
    so after the norm x0 > 0; gate and up rows read only x0, with signs per neuron k:
    k % 4 == 0: gate+ up+ | 1: gate+ up- | 2: gate- up+ | 3: gate- up-.
    Returns the expected active fractions (layers, neurons) at act(gate) and at act(gate)*up."""
    lay = find_layout(model)
    k = torch.arange(lay.intermediate_size)
    s_gate = torch.where(k % 4 < 2, 1.0, -1.0)
    s_up = torch.where(k % 2 == 0, 1.0, -1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            for proj, sign in ((layer.mlp.gate_proj, s_gate), (layer.mlp.up_proj, s_up)):
                proj.weight.zero_()
                proj.weight[:, 0] = 0.1 * sign
    act = (s_gate > 0).float().expand(lay.num_layers, -1)
    down = (s_gate * s_up > 0).float().expand(lay.num_layers, -1)
    return act, down


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_planted_signs_tell_act_gate_from_down_input(arch, tmp_path):
    """act(gate) > 0 and act(gate)*up > 0 differ on half the neurons by construction: each
    site reports exactly its own pattern on every sample, and the means do not depend on it."""
    model = tiny_model(arch)
    want_act, want_down = _plant_signs(model)
    assert not torch.equal(want_act, want_down)
    got = {}
    for site in ("act", "down_input"):
        path = tmp_path / f"{site}.safetensors"
        meta = capture(model, CharTokenizer(), CORPUS, path,
                       ActivationConfig(batch_size=2, max_length=12, lape_site=site))
        got[site] = Activations.load(path)
        if site == "act":
            assert meta["gated"] is True
    for i in range(len(got["act"].langs)):
        assert torch.equal(got["act"].active[i], want_act), i
        assert torch.equal(got["down_input"].active[i], want_down), i
    assert torch.equal(got["act"].mean, got["down_input"].mean)


def test_plain_mlp_sites_coincide(tmp_path):
    """BLOOM: the activation's output is the down projection's input, so both sites agree."""
    model = tiny_model("bloom")
    out = {}
    for site in ("act", "down_input"):
        capture(model, CharTokenizer(), CORPUS, tmp_path / f"{site}.safetensors",
                ActivationConfig(batch_size=3, max_length=12, lape_site=site))
        out[site] = Activations.load(tmp_path / f"{site}.safetensors")
    assert out["act"].meta["gated"] is False
    assert out["act"].meta["active_modules"][0].endswith("mlp.gelu_impl")
    assert torch.equal(out["act"].active, out["down_input"].active)


def test_activation_module_must_be_a_module_of_each_block(tmp_path):
    import torch.nn.functional as F

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    shared = model.model.layers[1].mlp.act_fn
    mlp.act_fn = shared
    with pytest.raises(RegionsError, match="same module object"):
        find_mlp_activations(model)
    del mlp.act_fn
    mlp.act_fn = F.silu  # a plain function: nothing to hook
    with pytest.raises(RegionsError, match="found none"):
        find_mlp_activations(model)
    # the down projection's input needs no activation module
    meta = capture(model, CharTokenizer(), CORPUS, tmp_path / "d.safetensors",
                   ActivationConfig(lape_site="down_input"))
    assert meta["active_site"] == SITE and meta["gated"] is None


def test_probabilities_are_token_weighted_per_language(model, tmp_path):
    path = tmp_path / "p.safetensors"
    capture(model, CharTokenizer(), CORPUS, path, ActivationConfig(batch_size=2, max_length=12))
    acts = Activations.load(path)
    langs, probs, site = activation_probabilities(path)
    assert langs == ["en", "fr"] and site == ACT_SITE
    for j, lang in enumerate(langs):
        rows = [i for i, l in enumerate(acts.langs) if l == lang]
        # share of the language's active tokens: sum of per-sample counts / total tokens
        counts = sum(acts.active[i].double() * int(acts.tokens[i]) for i in rows)
        want = (counts / sum(int(acts.tokens[i]) for i in rows)).float()
        assert torch.allclose(probs[j], want, atol=1e-6)
    assert torch.equal(acts.probabilities(), probs)
    only_fr = activation_probabilities(path, ["fr"])[1]
    assert torch.equal(only_fr[0], probs[1])
