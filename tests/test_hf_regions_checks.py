"""Issue 14 item 9: ``hf-regions`` checks region files, neuron files and entry specs before
the (slow) model load, and logs one line per applied edit (target, intervention, entries)."""

from __future__ import annotations

import logging

import pytest
import torch

from lmeval_regions.errors import ArtefactError, ModelMismatchError, RegionsError
from lmeval_regions.eval.model import HFRegionsLM


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model would be loaded."""
    from lm_eval.models.huggingface import HFLM

    def boom(self, *a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(HFLM, "__init__", boom)


def test_missing_region_file(tiny_lm_dir, tmp_path, no_load):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(RegionsError, match=f"region file '{missing}' does not exist"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), region=f"{missing}@zero")


def test_non_region_artefact(tiny_lm_dir, tmp_path, no_load):
    from lmeval_regions.importance import Importance

    imp = tmp_path / "imp.safetensors"
    Importance({"w": torch.ones(2)}, "sum_abs", {"params": {}, "sha256": "x"}).save(imp)
    with pytest.raises(ArtefactError, match=f"'{imp}' holds a 'importance' artefact, "
                                            "expected 'region'"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), region=str(imp))


@pytest.mark.parametrize("spec,match", [
    ("model.layers.*.input_layernorm.weight[2100]",
     r"index 2100 is out of range for a dimension of size 32"),
    ("model.layers.*.input_layrnorm.weight[3]", r"input_layrnorm.*Did you mean"),
])
def test_bad_entry_spec_fails_before_loading(tiny_lm_dir, no_load, spec, match):
    with pytest.raises(RegionsError, match=match):
        HFRegionsLM(pretrained=str(tiny_lm_dir), region=spec)


def test_region_of_another_model_fails_before_loading(tiny_lm_dir, tmp_path, no_load):
    """A region whose matrices have other shapes (hidden 48, the model's is 32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmeval_regions.regions import from_specs

    with torch.device("meta"):
        other = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))
    region = from_specs(other, "model.layers.0.self_attn.q_proj.weight[3, :]")
    region.save(tmp_path / "other.safetensors")
    with pytest.raises(ModelMismatchError, match=r"q_proj.weight' has shape \[48, 48\] in the "
                                                 r"file but \[32, 32\]"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), region=str(tmp_path / "other.safetensors"))


def test_missing_neuron_file(tiny_lm_dir, tmp_path, no_load):
    with pytest.raises(RegionsError, match="neurons file .* does not exist"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), neurons=str(tmp_path / "n.safetensors"))


def test_one_log_line_per_applied_edit(tiny_lm_dir, caplog):
    spec_a = "model.layers.0.input_layernorm.weight[3]"
    spec_b = "model.layers.*.mlp.down_proj.weight[:, 5]"
    with caplog.at_level(logging.INFO, logger="lm_eval.models.hf_regions"):
        lm = HFRegionsLM(pretrained=str(tiny_lm_dir), region=f"{spec_a}@constant:1;{spec_b}",
                         device="cpu", batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "lm_eval.models.hf_regions"]
    assert lines == [f"hf-regions: applied constant:1 to 1 entries of 1 parameters: {spec_a}",
                     f"hf-regions: applied zero to 64 entries of 2 parameters: {spec_b}"]
    assert [e["entries"] for e in lm.applied["edits"]] == [1, 64]  # 32 rows x 2 layers
