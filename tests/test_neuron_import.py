"""Published LAPE neuron files (``List[List[LongTensor]]`` written by ``torch.save``) become
NeuronSets: round trip, safe reading (no arbitrary unpickling), checks against the model, and
deactivation of an imported set through ``hf-regions``."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.activations import ACT_SITE
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.models import find_layout
from lmeval_regions.neurons import NeuronSet, import_lape, read_lape_file
from lmeval_regions.paper import LAPE_RELEASE_LANGS


class NotATensor:
    """Any pickled object other than tensors and containers must be refused."""

    def __reduce__(self):
        return (os.getenv, ("HOME",))


def _release_file(path, per_lang):
    """Write a file as the release's identify.py does: language -> layer -> LongTensor."""
    torch.save([[torch.tensor(h).long() for h in layers] for layers in per_lang], path)
    return path


PLANT = [[[1, 9, 30], [4]],   # en: layer 0 neurons 1, 9, 30; layer 1 neuron 4
         [[], [5, 63]],       # zh: nothing in layer 0
         [[0], []]]            # fr


def test_import_roundtrip(tmp_path):
    model = tiny_model("llama")
    lay = find_layout(model)
    path = _release_file(tmp_path / "tiny.neuron.pth", PLANT)
    ns = import_lape(path, model, "en,zh,fr")
    assert ns.sets == ["en", "zh", "fr"] and ns.method == "lape-release"
    assert ns.selected_at == {"en": ACT_SITE, "zh": ACT_SITE, "fr": ACT_SITE}
    assert ns.intermediate_size == lay.intermediate_size
    assert ns.info["languages"] == ["en", "zh", "fr"]
    for lang, layers in zip(ns.sets, PLANT):
        for layer, want in enumerate(layers):
            got = ns.indices[lang].get(lay.down_proj[layer], torch.tensor([], dtype=torch.int32))
            assert got.tolist() == sorted(want), (lang, layer)
    # saved as an artefact and loaded back against the model
    ns.save(tmp_path / "lape.safetensors")
    back = NeuronSet.load(tmp_path / "lape.safetensors", model)
    assert back.masks(lay.num_layers, lay.down_proj)["zh"].nonzero().tolist() == [[1, 5], [1, 63]]
    assert import_lape(path, model, ["a", "b", "c"]).sets == ["a", "b", "c"]
    assert len(LAPE_RELEASE_LANGS) == 7 and LAPE_RELEASE_LANGS[:2] == ("en", "zh")


def test_import_refuses_unsafe_or_malformed_files(tmp_path):
    model = tiny_model("llama")
    evil = tmp_path / "evil.pth"
    torch.save([[torch.tensor([1]).long(), NotATensor()]], evil)
    with pytest.raises(ArtefactError, match="read safely"):
        read_lape_file(evil)
    for obj, match in (({"en": [torch.tensor([1])]}, "holds a dict"),
                       ([[torch.tensor([1]), "x"]], "holds a str"),
                       ([[torch.tensor([1.0]), torch.tensor([2])]], "float32"),
                       ([[torch.tensor([[1, 2]]), torch.tensor([2])]], "1-D"),
                       ([torch.tensor([1])], "expected a list")):
        torch.save(obj, tmp_path / "bad.pth")
        with pytest.raises(ArtefactError, match=match):
            read_lape_file(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ArtefactError, match="read safely"):
        read_lape_file(tmp_path / "junk.pth")
    with pytest.raises(ArtefactError, match="does not exist"):
        read_lape_file(tmp_path / "missing.pth")
    ok = _release_file(tmp_path / "ok.pth", PLANT)
    with pytest.raises(RegionsError, match="3 languages but 2 names"):
        import_lape(ok, model, "en,zh")
    with pytest.raises(RegionsError, match="distinct"):
        import_lape(ok, model, "en,en,fr")
    three_layers = _release_file(tmp_path / "l3.pth", [[[1], [2], [3]]])
    with pytest.raises(ArtefactError, match="3 layers, the model has 2"):
        import_lape(three_layers, model, "en")
    too_wide = _release_file(tmp_path / "wide.pth", [[[1], [64]]])
    with pytest.raises(ArtefactError, match="neuron 64, outside the model's 64"):
        import_lape(too_wide, model, "en")
    twice = _release_file(tmp_path / "twice.pth", [[[1, 1], []]])
    with pytest.raises(ArtefactError, match="twice"):
        import_lape(twice, model, "en")


def test_imported_set_deactivates_through_hf_regions(tiny_lm_dir, tmp_path):
    """An imported set applied by hf-regions (zero) changes exactly what zeroing those
    down_proj columns by hand changes; noise:STD through model_args is recorded with its seed."""
    from transformers import AutoModelForCausalLM

    from lmeval_regions.eval.model import HFRegionsLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    ns = import_lape(_release_file(tmp_path / "t.pth", PLANT), ref, "en,zh,fr")
    ns.save(tmp_path / "lape.safetensors")
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    lm = HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", dtype="float32",
                     neurons=str(tmp_path / "lape.safetensors"), neuron_set="en")
    with torch.no_grad():
        got = lm.model(ids).logits
        ref.model.layers[0].mlp.down_proj.weight[:, [1, 9, 30]] = 0
        ref.model.layers[1].mlp.down_proj.weight[:, [4]] = 0
        want = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert lm.applied["neurons"]["sets"] == ["en"] and lm.applied["neurons"]["neurons"] == 4
    noisy = HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", dtype="float32",
                        neurons=str(tmp_path / "lape.safetensors"), neuron_set="zh",
                        neuron_intervention="noise:0.1")
    assert noisy.applied["neurons"]["intervention"] == "noise:0.1/0"
    clean = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(noisy.model(ids).logits, clean(ids).logits)
        noisy.remove_neuron_hooks()
        assert torch.equal(noisy.model(ids).logits, clean(ids).logits)
    with pytest.raises(RegionsError, match="seed"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu",
                    neurons=str(tmp_path / "lape.safetensors"), neuron_set="zh",
                    neuron_intervention="noise:0.1/x")


def test_import_neurons_command_reads_no_weights(tiny_lm_dir, tmp_path, monkeypatch):
    """`lmeval-regions import-neurons` builds the model from its config on the meta device
    (loading weights would be refused here) and writes the same sets as the library."""
    from transformers import AutoModelForCausalLM

    from lmeval_regions.cli import main

    def no_weights(*a, **k):
        raise AssertionError("import-neurons must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    path = _release_file(tmp_path / "tiny.neuron.pth", PLANT)
    out = tmp_path / "lape.safetensors"
    assert main(["import-neurons", "--model", str(tiny_lm_dir), "--file", str(path),
                 "--languages", "en,zh,fr", "--out", str(out)]) == 0
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    got = NeuronSet.load(out, model)
    want = import_lape(path, model, "en,zh,fr")
    assert got.sets == want.sets
    for s in want.sets:
        assert {m: t.tolist() for m, t in got.indices[s].items()} == \
            {m: t.tolist() for m, t in want.indices[s].items()}
    assert (tmp_path / "lape.config.yaml").exists()
