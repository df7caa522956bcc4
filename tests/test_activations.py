"""Activation capture on tiny llama/gemma3/bloom: pooled values equal a direct computation,
the artefact streams and reloads, hooks are removed, CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from lmeval_regions.activations import ActivationConfig, Activations, capture
from lmeval_regions.models import find_layout
from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError


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
    """Mean over tokens of each down projection's input, and fraction > 0, one text alone."""
    lay = find_layout(model)
    mods = dict(model.named_modules())
    got = {}
    hs = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: got.__setitem__(n, a[0][0].detach().float())) for n in lay.down_proj]
    try:
        with torch.no_grad():
            model(**{k: v.to(next(model.parameters()).device)
                     for k, v in tok([text], max_length=max_length).items()})
    finally:
        for h in hs:
            h.remove()
    x = torch.stack([got[n] for n in lay.down_proj])  # (L, T, I)
    return x.mean(1).cpu(), (x > 0).float().mean(1).cpu()


def _check_capture(model, tmp_path):
    tok = CharTokenizer()
    before = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    path = tmp_path / "acts.safetensors"
    meta = capture(model, tok, CORPUS, path, ActivationConfig(batch_size=2, max_length=12))
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == before
    lay = find_layout(model)
    assert meta["layers"] == lay.down_proj and meta["ids"]["fr"] == ["a", "b", "c"]
    acts = Activations.load(path)
    assert acts.mean.shape == (6, lay.num_layers, lay.intermediate_size)
    assert acts.langs == ["en"] * 3 + ["fr"] * 3 and acts.ids[:3] == ["a", "b", "c"]
    for i, (lang, uid) in enumerate(zip(acts.langs, acts.ids)):
        text = next(u["text"] for u in CORPUS[lang] if u["id"] == uid)
        mean, pos = _reference(model, tok, text, 12)
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
