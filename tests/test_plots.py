"""Issue 14 item 9: every PNG has a title naming the model and the settings, axis labels,
tick labels of at least 7 pt that do not overlap at the default size (measured on the
renderer), and is written readable by the group (umask 022 -> 0644)."""

from __future__ import annotations

import os
import stat
from itertools import combinations

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.studies import (
    further_pretrain,
    neuron_report,
    plotting,
    region_plots,
    robustness,
)

LANGS31 = ["ar", "zh", "cs", "da", "nl", "en", "fi", "fr", "de", "el", "hu", "id", "it", "ja",
           "ko", "ms", "ml", "no", "fa", "pl", "pt", "ro", "ru", "es", "sw", "sv", "ta", "tr",
           "uk", "vi", "hi"]


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved through save_figure, with its path."""
    saved = []
    real = plotting.save_figure

    def keep(fig, path, dpi=120):
        out = real(fig, path, dpi)
        saved.append((fig, out))
        return out

    for mod in (region_plots, neuron_report, robustness, further_pretrain):
        monkeypatch.setattr(mod, "save_figure", keep)
    old = os.umask(0o022)
    yield saved
    os.umask(old)


def overlapping(fig) -> list[tuple[str, str]]:
    """Pairs of visible tick labels (any axis of the figure) whose boxes overlap."""
    fig.draw_without_rendering()
    r = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [t for t in labels if t.get_visible() and t.get_text()]
            for a, b in combinations(shown, 2):
                if a.get_window_extent(r).overlaps(b.get_window_extent(r)):
                    bad.append((a.get_text(), b.get_text()))
    return bad


def check(fig, path, model: str, settings: list[str]) -> None:
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    assert model in title, title
    for s in settings:
        assert s in title, (s, title)
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>" or not ax.get_visible() or not ax.axison:
            continue
        if ax.lines or ax.patches or ax.images or ax.collections:  # a panel with data
            shared_x = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]
            assert ax.get_xlabel() or any(a.get_xlabel() for a in shared_x), \
                f"{path}: a panel without an x label"
            assert ax.get_ylabel(), f"{path}: a panel without a y label"
        for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if t.get_visible() and t.get_text():
                assert t.get_fontsize() >= 7, (path, t.get_text(), t.get_fontsize())
    assert overlapping(fig) == [], path
    assert path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)


def _region_30_layers():
    """A region over a 30-layer model (SmolLM2's depth), from specs on the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmeval_regions.regions import from_specs

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
            num_attention_heads=2, num_key_value_heads=1))
    r = from_specs(m, "model.layers.*.mlp.down_proj.weight[:, 1];"
                      "model.layers.*.self_attn.q_proj.weight[2, :]")
    r.spec = {"method": "top", "ratio": 0.01, "scope": "matrix", "model_name": "smollm2-135m",
              "source": {"languages": ["ar", "es"], "criterion": "sum_abs"}}
    return r


def test_distribution_plot(figures, tmp_path):
    region_plots.plot_distribution(_region_30_layers(), tmp_path / "dist.png")
    (fig, path), = figures
    check(fig, path, "smollm2-135m", ["top 1% per matrix", "ar,es", "sum_abs"])


def test_distribution_plot_would_overlap_without_thinning(figures, tmp_path, monkeypatch):
    """The control: with tick thinning off, the 30 layer labels collide (so the check above
    can fail)."""
    monkeypatch.setattr(plotting, "readable_ticks", lambda fig: None)
    region_plots.plot_distribution(_region_30_layers(), tmp_path / "dist.png")
    (fig, _), = figures
    assert overlapping(fig)


def test_region_heatmaps_name_the_model_from_the_fingerprint(figures, tmp_path):
    """Without a recorded name the title says what the fingerprint does."""
    from lmeval_regions.models import find_module_map
    from lmeval_regions.regions import select

    model = tiny_model("llama")
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters() if "layers" in n
              and p.dim() == 2}
    from lmeval_regions.artefacts import model_fingerprint

    region = select(scores, "bottom", 0.05, model=model_fingerprint(model))
    paths = region_plots.plot_region_heatmaps(region, find_module_map(model), tmp_path)
    assert len(figures) == len(paths) == 7
    n = sum(p.numel() for p in model.parameters()) / 1e6
    for fig, path in figures:
        check(fig, path, f"model with 2 layers, {n:.1f}M parameters", ["bottom 5% per matrix"])


def test_sweep_plot(figures, tmp_path):
    rows = [{"dim": None, "ppl": 10.0}] + [{"dim": d, "ppl": 10.0 + d} for d in range(12)]
    region_plots.plot_sweep(rows, tmp_path / "s.png", labels={3: "outlier"},
                            context="gemma-3-270m; units 25..26")
    (fig, path), = figures
    check(fig, path, "gemma-3-270m", ["units 25..26"])


def test_neuron_report_plots(figures, tmp_path):
    g = torch.Generator().manual_seed(0)
    langs = [l for l in LANGS31 for _ in range(4)]
    x = torch.nn.functional.normalize(torch.rand(len(langs), 20, generator=g), dim=1)
    result = {"languages": LANGS31, "samples_per_language": {l: 4 for l in LANGS31},
              "layers": 30, "neurons_per_layer": 1536, "threshold": 2.0, "percentile": None}
    ctx = neuron_report.report_context(result, "smollm2-135m")
    neuron_report.plot_similarity(x @ x.T, langs, tmp_path / "sim.png", context=ctx)
    neuron_report.plot_layerwise([{"layer": l, "lrds": 0.1 * l, "sads": -0.01 * l}
                                  for l in range(30)], tmp_path / "lw.png", ctx)
    neuron_report.plot_layer_distribution({l: list(range(30)) for l in LANGS31},
                                          tmp_path / "kl.png", ctx)
    assert len(figures) == 3
    for fig, path in figures:
        check(fig, path, "smollm2-135m", ["31 languages", "4 samples per language",
                                          "30 layers x 1536 neurons", "z > 2"])


def test_robustness_plots(figures, tmp_path):
    labels = [f"{c}/{v}" for c in ("sum_abs", "abs_sum", "fisher", "magnitude", "wanda")
              for v in ("full", "half1", "half2")]
    per_layer = {str(l): 0.5 for l in range(30)}
    report = {"model": "smollm2-135m", "languages": ["ar", "es"], "batch_size": 4,
              "max_length": 128,
              "config": {"split_half": True, "snapshots": [10], "criteria": ["sum_abs"]},
              "jaccard": {"0.01": {"labels": labels,
                                   "matrix": torch.rand(len(labels), len(labels)).tolist(),
                                   "pairs": {f"{a} ~ {b}": {"per_layer": per_layer}
                                             for a, b in combinations(labels, 2)}}},
              "effects": {"0.01": {"rows": {**{f"{l} Top": {"ppl_ratio": 5.0} for l in labels},
                                            **{f"{l} Bottom": {"ppl_ratio": 1.01}
                                               for l in labels},
                                            "Random s0": {"ppl_ratio": 1.2}}}}}
    robustness._plots(report, tmp_path)
    assert len(figures) == 3
    for fig, path in figures:
        check(fig, path, "smollm2-135m", ["ar,es", "split-half True", "snapshots [10]"])


def test_further_pretrain_plot(figures, tmp_path):
    curve = [{"step": s, "ppl": {l: 10.0 + s for l in ("ar", "en", "zh")}} for s in (0, 4, 8)]
    result = {"model": "smollm2-135m",
              "config": {"recipe": {"lang": "ar", "ratio": 0.05, "steps": 8, "lr": 3e-4,
                                    "modes": ["full", "freeze"]}},
              "runs": [{"mode": m, "paper_label": None, "curve": curve} for m in
                       ("full", "freeze")]}
    further_pretrain.plot(result, tmp_path / "curves.png")
    (fig, path), = figures
    check(fig, path, "smollm2-135m", ["Top 5% per matrix", "8 steps", "full, freeze"])
