"""Paper 2 on the real Gemma-3-270M (slow tier, ~2-3 min on 2 CPU cores): a small version of
the documented `lmeval-regions neurons` run (6 languages x 6 UDHR units, 64 tokens)."""

from __future__ import annotations

import pytest

from lmeval_regions import neurons as N
from lmeval_regions.activations import ActivationConfig, Activations, capture
from lmeval_regions.corpora import load_parallel
from lmeval_regions.studies.neuron_report import analyse, write_report

LANGS = ["en", "zh", "fr", "ar", "hi", "ru"]


@pytest.mark.slow
def test_gemma_lrds_sads_key_neurons_and_deactivation(gemma, shared_data, tmp_path):
    model, tok = gemma
    rows = load_parallel(shared_data / "udhr_parallel_31.jsonl", LANGS)
    corpus = {l: u[:6] for l, u in rows.items()}
    before = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    capture(model, tok, corpus, tmp_path / "a.safetensors",
            ActivationConfig(batch_size=6, max_length=64))
    acts = Activations.load(tmp_path / "a.safetensors", model=model)
    result, ns = analyse(acts, model)
    assert result["lrds"] > 0 and result["sads"] > 0
    assert result["sklr"] > 0
    texts = {l: [u["text"] for u in rows[l][6:8]] for l in ("zh", "ar")}
    ppl = N.direct_ppl(model, tok, ns, texts, "zero", max_length=64)
    table = N.deactivation_table(ppl, ["zh", "ar"], ["zh", "ar"])
    assert all(v > 0 for v in table["base"].values())
    # zeroing a language's key neurons raises its own perplexity
    assert table["change"]["zh"]["zh"] > 0 and table["change"]["ar"]["ar"] > 0
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == before
    write_report(tmp_path / "r", result, acts, table)
    assert (tmp_path / "r" / "similarity.png").stat().st_size > 1000
