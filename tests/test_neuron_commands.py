"""The neuron CLI on tiny models: `neurons --ppl lm-eval` (deactivation through hf-regions and
the udhr_ppl tasks) agrees with the direct computation, and `neuron-sweep` tabulates the same
metrics as computing them model by model."""

from __future__ import annotations

import json

import pytest
import torch

from lmeval_regions.cli import main

LANGS = "en,fr,de,es,it,pt,nl"


def _args(model, data, out, *extra):
    return ["neurons", "--model", str(model), "--langs", LANGS, "--units", "6",
            "--max-length", "64", "--batch-size", "7", "--texts", str(data), "--out", str(out),
            "--eval-langs", "en,fr", "--eval-units", "2", *extra]


def test_neurons_lm_eval_path_matches_direct(tiny_lm_dir, shared_data, tmp_path):
    data = shared_data / "udhr_parallel_31.jsonl"
    assert main(_args(tiny_lm_dir, data, tmp_path / "direct")) == 0
    direct = json.loads((tmp_path / "direct" / "neurons.json").read_text())
    assert main(_args(tiny_lm_dir, data, tmp_path / "lmeval", "--ppl", "lm-eval",
                      "--activations", str(tmp_path / "direct" / "activations.safetensors"))) == 0
    via = json.loads((tmp_path / "lmeval" / "neurons.json").read_text())
    # same key neurons (same activations); the lm-eval path evaluates the task's held-out
    # units (25, 26), the direct path the units after --units (6, 7): compare base values only
    # through their own definitions, and the structure of the table
    t_direct, t_via = direct["deactivation"], via["deactivation"]
    assert set(t_via["change"]) == set(t_direct["change"]) == {"en", "fr"}
    assert all(v > 1 for v in t_via["base"].values())
    assert any(t_via["change"][r][c] != 0 for r in ("en", "fr") for c in ("en", "fr"))


def test_neuron_sweep_tabulates_each_model(tiny_lm_dir, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(other)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(other)

    out = tmp_path / "sweep"
    argv = ["neuron-sweep", "--models", f"{tiny_lm_dir},{other}", "--langs", LANGS,
            "--units", "6", "--max-length", "64", "--batch-size", "7",
            "--texts", str(shared_data / "udhr_parallel_31.jsonl"), "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["model"] for r in rows] == [str(tiny_lm_dir), str(other)]
    # each row equals the metrics computed from that model's own capture
    from lmeval_regions import neurons as N
    from lmeval_regions.activations import Activations

    for i, r in enumerate(rows):
        acts = Activations.load(out / f"activations-{i}.safetensors")
        got = N.lrds_sads(N.similarity(acts), acts.langs, acts.ids)
        assert r["lrds"] == pytest.approx(got["lrds"]) and r["sads"] == pytest.approx(got["sads"])
        assert r["sklr"] == N.key_neurons(acts).sklr
    assert rows[0]["lrds"] != rows[1]["lrds"]
    assert "| model | LRDS |" in (out / "sweep.md").read_text()
