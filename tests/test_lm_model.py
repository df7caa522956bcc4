"""The ``hf-regions`` lm-eval model: edits from model_args equal hand edits, exactly."""

from __future__ import annotations

import pytest
import torch
from lm_eval_helpers import TASK, sample_loglikelihoods, udhr_texts, write_ppl_task

from lmeval_regions.errors import RegionsError
from lmeval_regions.regions import select

SPEC = "model.layers.0.mlp.down_proj.weight[:, 5];model.layers.1.input_layernorm.weight[3]"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared_data):
    return write_ppl_task(tmp_path_factory.mktemp("tasks"), udhr_texts(shared_data))


def _evaluate(model, model_args=None, task_dir=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                                   task_manager=TaskManager(include_path=str(task_dir),
                                                            include_defaults=False),
                                   log_samples=True, batch_size=1, device="cpu")


def _hflm_on(model, tok_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tok_dir), batch_size=1)


def _load(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()


def test_python_api_zero_region_equals_hand_edit(tiny_lm_dir, task_dir, tmp_path):
    """A region artefact + an entry spec zeroed through model_args (a dict, Python API) give
    exactly the log-likelihoods of hf on a model whose same entries were zeroed by hand."""
    ref = _load(tiny_lm_dir)
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
              for n, p in ref.named_parameters() if "self_attn.o_proj" in n}
    region = select(scores, "top", 0.05, model=None)
    region.save(tmp_path / "top.safetensors")

    args = {"pretrained": str(tiny_lm_dir), "region": f"{tmp_path / 'top.safetensors'};{SPEC}",
            "dtype": "float32"}
    ours = _evaluate("hf-regions", args, task_dir)

    params = dict(ref.named_parameters())
    with torch.no_grad():  # by hand, independently of Editor
        for n, idx in region.indices.items():
            params[n].data.view(-1)[idx.long()] = 0
        params["model.layers.0.mlp.down_proj.weight"].data[:, 5] = 0
        params["model.layers.1.input_layernorm.weight"].data[3] = 0
    hand = _evaluate(_hflm_on(ref, tiny_lm_dir), None, task_dir)
    base = _evaluate("hf", {"pretrained": str(tiny_lm_dir), "dtype": "float32"}, task_dir)

    a, b, c = (sample_loglikelihoods(r) for r in (ours, hand, base))
    assert a == b  # exact
    assert a != c  # and the edit did change something
    assert (ours["results"][TASK]["word_perplexity,none"]
            == hand["results"][TASK]["word_perplexity,none"])
    applied = ours["config"]["regions"]["edits"]
    assert [e["entries"] for e in applied] == [region.numel(), 32, 1]  # down_proj is 32 x 64
    assert applied[0]["intervention"] == "zero" and "sha256" in applied[0]


def test_interventions_and_default_equal_hand_edit(tiny_lm_dir, task_dir):
    from lmeval_regions.eval.model import HFRegionsLM

    lm = HFRegionsLM(pretrained=str(tiny_lm_dir), dtype="float32", batch_size=1, device="cpu",
                     intervention="scale:3",
                     region="model.layers.*.input_layernorm.weight[2];"
                            "model.layers.1.self_attn.q_proj.weight[4, :]@constant:0.5;"
                            "model.layers.0.mlp.up_proj.weight[7]@noise:0.1/3")
    ref = _load(tiny_lm_dir)
    p = dict(ref.named_parameters())
    with torch.no_grad():
        for i in (0, 1):
            p[f"model.layers.{i}.input_layernorm.weight"].data[2] *= 3
        p["model.layers.1.self_attn.q_proj.weight"].data[4, :] = 0.5
    got = dict(lm.model.named_parameters())
    for n in p:
        if n != "model.layers.0.mlp.up_proj.weight":
            assert torch.equal(got[n], p[n]), n
    up, up0 = got["model.layers.0.mlp.up_proj.weight"], p["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(up[:7], up0[:7]) and torch.equal(up[8:], up0[8:])
    assert not torch.equal(up[7], up0[7])  # noise changed row 7 only
    assert [e["intervention"] for e in lm.applied["edits"]] == ["scale:3", "constant:0.5",
                                                                "noise:0.1/3"]
    lm.restore_edits()  # bit-exact undo
    assert all(torch.equal(got[n], _load(tiny_lm_dir).state_dict()[n])
               for n in ("model.layers.0.mlp.up_proj.weight",))


def test_neurons_zero_equals_zeroed_down_proj_columns(tiny_lm_dir, task_dir, tmp_path):
    """Zeroing MLP neurons j (inputs of down_proj) == zeroing down_proj's columns j by hand."""
    from lmeval_regions.neurons import NeuronSet

    ref = _load(tiny_lm_dir)
    masks = {"ar": torch.zeros(2, 64, dtype=torch.bool), "es": torch.zeros(2, 64, dtype=torch.bool)}
    masks["ar"][0, [1, 9, 30]] = True
    masks["ar"][1, [4]] = True
    masks["es"][1, [5]] = True
    NeuronSet.from_masks(masks, ref).save(tmp_path / "neurons.safetensors")
    ours = _evaluate("hf-regions", {"pretrained": str(tiny_lm_dir), "dtype": "float32",
                                    "neurons": str(tmp_path / "neurons.safetensors"),
                                    "neuron_set": "ar"}, task_dir)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[:, [1, 9, 30]] = 0
        ref.model.layers[1].mlp.down_proj.weight[:, [4]] = 0
    hand = _evaluate(_hflm_on(ref, tiny_lm_dir), None, task_dir)
    torch.testing.assert_close(torch.tensor(sample_loglikelihoods(ours), dtype=torch.float64),
                               torch.tensor(sample_loglikelihoods(hand), dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    assert ours["config"]["regions"]["neurons"]["sets"] == ["ar"]
    assert ours["config"]["regions"]["neurons"]["neurons"] == 4


@pytest.mark.parametrize("args, match", [
    ({"regoin": "x"}, "Did you mean 'region'"),
    ({"neuron_sets": "ar"}, "Did you mean 'neuron_set'"),
    ({"region": "model.layers.0.mlp.down_proj.weight[1]", "intervention": "zeros"}, "zeros"),
    ({"region": "model.layers.0.mlp.down_proj.weight[1]@scale"}, "needs a value"),
    ({"region": "model.layers.9.mlp.down_proj.weight[1]"}, "matches no parameter"),
    ({"region": "missing.safetensors"}, "missing.safetensors"),
    ({"region": ""}, "needs a value"),
    ({"neuron_set": "ar"}, "needs 'neurons=PATH'"),
])
def test_bad_model_args(tiny_lm_dir, args, match):
    from lmeval_regions.eval.model import HFRegionsLM

    with pytest.raises(RegionsError, match=match):
        HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", **args)


def test_unknown_neuron_set_and_keys_do_not_reach_from_pretrained(tiny_lm_dir, tmp_path):
    from lmeval_regions.eval.model import HFRegionsLM
    from lmeval_regions.neurons import NeuronSet

    ref = _load(tiny_lm_dir)
    m = torch.zeros(2, 64, dtype=torch.bool)
    m[0, 1] = True
    NeuronSet.from_masks({"ar": m, "es": m}, ref).save(tmp_path / "n.safetensors")
    with pytest.raises(RegionsError, match="'arr' is not in .*Did you mean: ar"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu",
                    neurons=str(tmp_path / "n.safetensors"), neuron_set="arr")
    with pytest.raises(RegionsError, match=r"neuron sets \['ar', 'es'\]"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu",
                    neurons=str(tmp_path / "n.safetensors"))
    lm = HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", dtype="float32",
                     region="model.layers.0.mlp.down_proj.weight[1]", intervention="zero")
    for key in ("region", "intervention", "neurons", "neuron_set", "neuron_intervention"):
        assert not hasattr(lm.model.config, key)


def test_offloaded_parameter_is_a_clear_error(tiny_lm_dir):
    from transformers import AutoTokenizer

    from lmeval_regions.eval.model import HFRegionsLM

    model = _load(tiny_lm_dir)
    w = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
        torch.empty_like(w, device="meta"))
    with pytest.raises(RegionsError, match="offloaded"):
        HFRegionsLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_lm_dir),
                    region="model.layers.0.mlp.down_proj.weight[1]")


def test_peft_adapter_regions_use_base_names(tiny_lm_dir, tmp_path):
    """With peft=..., LoRA-wrapped weights are addressed by their plain names."""
    from peft import LoraConfig, get_peft_model

    from lmeval_regions.eval.model import HFRegionsLM

    peft_model = get_peft_model(_load(tiny_lm_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    lm = HFRegionsLM(pretrained=str(tiny_lm_dir), peft=str(tmp_path / "adapter"), device="cpu",
                     dtype="float32", region="model.layers.1.self_attn.q_proj.weight[2, :]")
    w = dict(lm.model.named_parameters())[
        "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"]
    assert torch.count_nonzero(w[2]) == 0 and torch.count_nonzero(w[3]) == w.shape[1]
    assert lm.applied["edits"][0]["entries"] == w.shape[1]


def test_embedded_name_resolves(monkeypatch, tiny_lm_dir):
    """``pretrained=`` an embedded name goes through models.resolve_pretrained."""
    import lmeval_regions.eval.model as lm_mod

    seen = []
    monkeypatch.setattr(lm_mod, "resolve_pretrained", lambda n: seen.append(n) or str(tiny_lm_dir))
    lm = lm_mod.HFRegionsLM(pretrained="smollm2-135m", device="cpu")
    assert seen == ["smollm2-135m"] and lm.model.config.hidden_size == 32


def test_batch_order_length_is_hf_batching_of_sorted_documents(tiny_lm_dir, shared_data):
    # Batched, hf-regions takes perplexity documents longest first (lm-eval pads each batch
    # of consecutive documents to its longest). batch_order=request is hf's own batching bit
    # for bit; length order is hf's batching of the documents sorted by length, bit for bit,
    # and both agree with batch size 1 up to the summation order of the matrix products.
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmeval_regions.eval.model import HFRegionsLM

    texts = udhr_texts(shared_data, ("en", "ar", "zh"), 4)
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]

    def ll(lm, rs):
        return [float(x) for x in lm.loglikelihood_rolling(rs, disable_tqdm=True)]

    common = {"pretrained": str(tiny_lm_dir), "device": "cpu", "add_bos_token": False}
    hf = HFLM(**common, batch_size=4)
    by_length = HFRegionsLM(**common, batch_size=4)
    assert by_length.batch_order == "length"
    order = sorted(range(len(reqs)), key=lambda i: -len(hf.tok_encode(texts[i])))
    assert order != list(range(len(reqs)))  # the order does change here
    sorted_hf = ll(hf, [reqs[i] for i in order])
    got = ll(by_length, reqs)
    assert [got[i] for i in order] == sorted_hf
    assert ll(HFRegionsLM(**common, batch_size=4, batch_order="request"), reqs) == ll(hf, reqs)
    one = ll(HFLM(**common, batch_size=1), reqs)
    assert got == pytest.approx(one, rel=1e-5)
    with pytest.raises(RegionsError, match="batch_order"):
        HFRegionsLM(**common, batch_order="shortest")
