"""The further pre-training recipe's modes on a tiny Llama (paper 1 Fig. 5/6 and Table 2)."""

from __future__ import annotations

import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.importance import Importance
from lmeval_regions.paper import PAPER1_TRAIN_LANGS
from lmeval_regions.regions import Region, select_from_importance
from lmeval_regions.studies.further_pretrain import FurtherPretrainConfig, run_further_pretrain


def synthetic_units(langs, n=8, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven"]
    return {l: [{"id": str(i), "text": " ".join(rng.choice(words) for _ in range(12))}
                for i in range(n)] for l in langs}


def test_recipe_remove_then_freeze_modes(tiny_lm_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = synthetic_units(set(PAPER1_TRAIN_LANGS) | {"en"})
    cfg = FurtherPretrainConfig(
        lang="ar", modes=("full", "remove_freeze", "remove_unfreeze", "remove_bottom_freeze"),
        ratio=0.05, steps=3, eval_every=3, lr=1e-2, warmup=1, out=str(tmp_path))
    corpus = CorpusConfig(units=4, batch_size=2, max_length=16)
    heldout = HeldOutConfig(eval_langs=("en",), eval_start=4)
    result = run_further_pretrain(cfg, corpus, heldout, model=model, tokenizer=tok, data=data)
    runs = {r["mode"]: r for r in result["runs"]}
    # removed and frozen: exactly zero at the end; removed and unfrozen: trained away from zero
    for mode in ("remove_freeze", "remove_bottom_freeze"):
        assert runs[mode]["max_abs_value_in_region"] == 0.0
        assert runs[mode]["max_abs_change_in_region"] == 0.0
    assert runs["remove_unfreeze"]["max_abs_value_in_region"] > 0
    assert runs["remove_freeze"]["paper_label"] == "Top & Freeze"
    # step 0 is measured after the removal
    base = runs["full"]["curve"][0]["ppl"]["ar"]
    assert runs["remove_freeze"]["curve"][0]["ppl"]["ar"] != base
    assert runs["remove_freeze"]["curve"][0] == runs["remove_unfreeze"]["curve"][0]
    # regions: Top/Bottom of the cached core score; every run restored the weights
    core = Importance.load(tmp_path / "core_importance.safetensors", model)
    assert core.criterion == "sum_abs" and sorted(core.languages) == sorted(PAPER1_TRAIN_LANGS)
    for band, name in (("top", "core.safetensors"), ("bottom", "core_bottom.safetensors")):
        got, ref = Region.load(tmp_path / name), select_from_importance(core, band, 0.05)
        assert all(torch.equal(got.indices[n], ref.indices[n]) for n in ref.indices)
    assert runs["remove_bottom_freeze"]["region"].endswith("core_bottom.safetensors")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    saved = json.loads((tmp_path / "result.json").read_text())
    assert [r["mode"] for r in saved["runs"]] == list(cfg.modes)
    assert (tmp_path / "curves.png").stat().st_size > 0
