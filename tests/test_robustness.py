"""The robustness report end to end on a tiny Llama: variants, Jaccard (checked against the
saved artefacts by an independent computation), removal effects, files."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmeval_regions.corpora import batches
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import Importance, combine, compute_importance
from lmeval_regions.models.architecture import matrix_kind
from lmeval_regions.perplexity import perplexities
from lmeval_regions.studies.robustness import RobustnessConfig, run_robustness


def texts(n, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def topk_sets(imp, ratio):
    """Top entries per matrix by torch.topk with k = max(1, int(ratio * n)) (no library code)."""
    out = {}
    for n, s in imp.scores.items():
        flat = s.reshape(-1)
        out[n] = set(torch.topk(flat, max(1, int(ratio * flat.numel()))).indices.tolist())
    return out


def test_robustness_report_end_to_end(tiny_lm_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():  # break the init's ties so Top/Bottom are well defined
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    corpus = {"ar": texts(6, 1), "es": texts(5, 2)}
    heldout = {"ar": texts(2, 3), "en": texts(2, 4)}
    cfg = RobustnessConfig(criteria=("sum_abs", "abs_sum", "fisher", "magnitude", "wanda"),
                           ratios=(0.05, 0.2), split_half=True, snapshots=(2,), seeds=(0, 1),
                           eval_max_length=32, out=str(tmp_path / "rep"))
    rep = run_robustness(model, tok, corpus, heldout, cfg, batch_size=2, max_length=24)
    for n, p in model.named_parameters():  # edits restored, nothing trained
        assert torch.equal(p.detach(), before[n]), n

    out = tmp_path / "rep"
    saved = json.loads((out / "report.json").read_text())
    assert saved["variants"].keys() == rep["variants"].keys()
    labels = [f"{c}/{v}" for c in cfg.criteria for v in ("full", "half1", "half2", "n2")]
    assert list(rep["variants"]) == labels
    md = (out / "report.md").read_text()
    assert all(l in md for l in labels) and "## Removing 0.05 per matrix" in md
    for png in saved["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"jaccard_0.05.png", "jaccard_layers_0.2.png", "effects_0.2.png"} <= set(saved["plots"])

    imps = {l: Importance.load(out / saved["variants"][l]["file"], model) for l in labels}
    # halves are disjoint and add up: ar 6 -> 3 + 3, es 5 -> 3 + 2; the snapshot: 2 + 2
    assert [imps[f"sum_abs/{v}"].n_sequences for v in ("full", "half1", "half2", "n2")] == \
        [11, 6, 5, 4]
    assert imps["sum_abs/n2"].snapshot == 2 and imps["wanda/full"].criterion == "wanda"
    # each core is the sum over the corpus' languages, in corpus order (kept as a running sum)
    assert all(i.languages == list(corpus) for i in imps.values())
    # the full-corpus variant is the core score of a direct run per language over the same
    # batches (each half cut into batches of 2: 6 -> [2, 1] + [2, 1], 5 -> [2, 1] + [2])
    def halves(t):
        cut = math.ceil(len(t) / 2)
        return list(batches(tok, t[:cut], 2, 24)) + list(batches(tok, t[cut:], 2, 24))

    direct = combine([compute_importance(model, halves(t), languages=[l], progress=False)
                      for l, t in corpus.items()])
    for n in direct.scores:
        torch.testing.assert_close(imps["sum_abs/full"].scores[n], direct.scores[n],
                                   rtol=1e-4, atol=1e-9)

    for ratio in cfg.ratios:
        jac = saved["jaccard"][f"{ratio:g}"]
        assert jac["labels"] == labels
        sets = {l: topk_sets(imps[l], ratio) for l in labels}
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                inter = sum(len(sets[a][n] & sets[b][n]) for n in sets[a])
                union = sum(len(sets[a][n] | sets[b][n]) for n in sets[a])
                assert jac["matrix"][i][j] == pytest.approx(inter / union), (ratio, a, b)
        pair = jac["pairs"]["sum_abs/half1 ~ sum_abs/half2"]
        a, b = sets["sum_abs/half1"], sets["sum_abs/half2"]
        for kind in {matrix_kind(n) for n in a}:
            names = [n for n in a if matrix_kind(n) == kind]
            inter = sum(len(a[n] & b[n]) for n in names)
            union = sum(len(a[n] | b[n]) for n in names)
            assert pair["per_module"][kind] == pytest.approx(inter / union), kind
        layer0 = [n for n in a if ".layers.0." in n]
        assert pair["per_layer"]["0"] == pytest.approx(
            sum(len(a[n] & b[n]) for n in layer0) / sum(len(a[n] | b[n]) for n in layer0))
    # magnitude ignores the corpus: its variants agree exactly
    j = saved["jaccard"]["0.05"]
    m = labels.index("magnitude/full")
    assert j["matrix"][m][m + 1] == j["matrix"][m][m + 3] == 1.0

    # removal effects: base and one Top row recomputed independently
    eff = saved["effects"]["0.2"]
    base = perplexities(model, tok, heldout, 32, 4)
    assert eff["base"]["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert {"Random s0", "Random s1", "fisher/half2 Top", "wanda/n2 Bottom"} <= set(eff["rows"])
    params = dict(model.named_parameters())
    sets = topk_sets(imps["fisher/full"], 0.2)
    with torch.no_grad():
        for n, idx in sets.items():
            params[n].view(-1)[torch.tensor(sorted(idx))] = 0
    zeroed = perplexities(model, tok, heldout, 32, 4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    assert eff["rows"]["fisher/full Top"]["ppl_ratio"] == pytest.approx(
        zeroed["ppl"] / base["ppl"], rel=1e-5)
    assert eff["rows"]["fisher/full Top"]["per_lang"]["en"] == pytest.approx(
        zeroed["ppl_per_lang"]["en"] / base["ppl_per_lang"]["en"], rel=1e-5)
    assert all(math.isfinite(r["ppl_ratio"]) for r in eff["rows"].values())


def test_robustness_config_and_input_errors(tiny_lm_dir, tmp_path):
    with pytest.raises(RegionsError, match="'fishr' is not one of.*Did you mean: fisher"):
        RobustnessConfig(criteria=("fishr",))
    with pytest.raises(RegionsError, match="outside"):
        RobustnessConfig(ratios=(1.5,))
    with pytest.raises(RegionsError, match="include_norms with criterion 'wanda'"):
        RobustnessConfig(include_norms=True)
    with pytest.raises(RegionsError, match="Random baseline needs at least one seed"):
        RobustnessConfig(seeds=())
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    cfg = RobustnessConfig(out=str(tmp_path), snapshots=(9,))
    with pytest.raises(RegionsError, match="snapshot at 9 sequences, but language 'ar' has 4"):
        run_robustness(model, tok, {"ar": texts(4, 0)}, {"ar": texts(1, 0)}, cfg)
    with pytest.raises(RegionsError, match="needs held-out texts"):
        run_robustness(model, tok, {"ar": texts(4, 0)}, None, RobustnessConfig(out=str(tmp_path)))
