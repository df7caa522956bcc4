#!/usr/bin/env python
"""Further pre-training on one language with the core region free, frozen, soft, or removed
first (paper 1 §3.5 Fig. 5/6, and Table 2): target and non-target perplexity at checkpoints,
as JSON and a PNG plot.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m lmeval_regions.studies.further_pretrain \
        --model smollm2-135m --lang ar --steps 12 --lr 3e-4 --mode full freeze soft \
        --out runs/fpt_ar

Modes (every one starts from the same weights and sees the same batches):

=====================  ==================================================================
``full``               no protection (full-parameter training)
``freeze``             the core (Top) region kept bit-identical (Fig. 5/6)
``soft``               the core region's updates scaled by ``alpha`` / clamped
``remove_freeze``      Table 2 ``Top & Freeze``: Top region zeroed, kept at exactly zero
``remove_unfreeze``    Table 2 ``Top & Unfreeze``: Top region zeroed, then trained freely
``remove_bottom_freeze``  Table 2 ``Bottom & Freeze``: Bottom region zeroed, kept at zero
=====================  ==================================================================

The core score (Σ_l importance over ar/es/ru/zh/ko/vi, first ``n_train`` UDHR units each,
paper 1's ``sum_abs`` criterion) is computed once and cached as ``<out>/core_importance
.safetensors``; its Top (Bottom) ``ratio`` per matrix is ``core.safetensors``
(``core_bottom.safetensors``) unless ``region`` (``bottom_region``) gives one. Training uses
UDHR units 0..n_train-1 of ``lang`` (cycled); evaluation the later units (n_train..49) of
``lang`` and ``eval_langs``; step 0 is evaluated after the removal. For lm-eval numbers on saved
checkpoints, see docs/trainer_ext.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.corpora import batches, load_parallel, split_units
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.importance import Importance, combine, compute_importance
from lmeval_regions.models import load_model
from lmeval_regions.paper import PAPER1_TRAIN_LANGS
from lmeval_regions.perplexity import perplexity
from lmeval_regions.regions import Region, select_from_importance
from lmeval_regions.studies.plotting import save_figure, subplots
from lmeval_regions.training import FreezeRegionAdapter, FreezeRegionConfig

MODES = ("full", "freeze", "soft", "remove_freeze", "remove_unfreeze", "remove_bottom_freeze")
PAPER_LABELS = {"remove_freeze": "Top & Freeze", "remove_unfreeze": "Top & Unfreeze",
                "remove_bottom_freeze": "Bottom & Freeze"}
"""Paper 1 Table 2's names of the remove-then-train modes."""


@dataclass
class FurtherPretrainConfig:
    """Settings of the further pre-training recipe."""

    model: str = "smollm2-135m"
    """Embedded model name or a local HF folder."""
    lang: str = "ar"
    """Training language (UDHR code)."""
    eval_langs: tuple[str, ...] = ("en", "es", "zh", "ru")
    """Other languages evaluated at each checkpoint (forgetting)."""
    modes: tuple[str, ...] = ("full", "freeze", "soft")
    """Runs, each from the same weights: full, freeze, soft, remove_freeze (Top & Freeze),
    remove_unfreeze (Top & Unfreeze), remove_bottom_freeze (Bottom & Freeze)."""
    region: str | None = None
    """Top region .safetensors (default: Top ``ratio`` per matrix of the core score)."""
    bottom_region: str | None = None
    """Bottom region for remove_bottom_freeze (default: Bottom ``ratio`` of the core score)."""
    ratio: float = 0.05
    """Core region size per matrix."""
    steps: int = 12
    """Optimizer steps per run."""
    eval_every: int = 4
    """Steps between evaluations (and at the last step)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    warmup: int = 2
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    alpha: float = 0.1
    """soft mode: kept fraction of each update inside the region."""
    max_update: float | None = None
    """soft mode: per-entry bound on |update| per step."""
    batch_size: int = 4
    """Sequences per training (and importance) batch."""
    max_length: int = 128
    """Tokens per sequence."""
    n_train: int = 25
    """UDHR units per language for training and importance (held-out: 25..49)."""
    out: str = "runs/further_pretrain"
    """Output folder: result.json, curves.png, cached core regions."""

    def __post_init__(self) -> None:
        self.modes, self.eval_langs = tuple(self.modes), tuple(self.eval_langs)
        for m in self.modes:
            if m not in MODES:
                raise RegionsError(f"mode '{m}' is not one of {MODES}." + did_you_mean(m, MODES))
        if not self.modes:
            raise RegionsError(f"modes is empty; expected some of {MODES}")
        if self.steps < 1 or self.eval_every < 1:
            raise RegionsError(f"steps={self.steps} and eval_every={self.eval_every} must be >= 1")
        if not 1 <= self.n_train <= 25:
            raise RegionsError(f"n_train={self.n_train}: expected 1..25 (units 25..49 are "
                               "held out)")


def _core_importance(model, tok, data, cfg: FurtherPretrainConfig, out: Path) -> Importance:
    path = out / "core_importance.safetensors"
    if path.exists():
        return Importance.load(path, model)
    parts = []
    for lang in PAPER1_TRAIN_LANGS:
        texts = [u["text"] for u in data[lang][:cfg.n_train]]
        parts.append(compute_importance(model, batches(tok, texts, cfg.batch_size, cfg.max_length),
                                        languages=[lang], progress=False))
    core = combine(parts)
    core.save(path)
    return core


def regions_for(model, tok, data, cfg: FurtherPretrainConfig, out: Path) -> dict[str, Path]:
    """``{"top": path, "bottom": path}`` of the regions the chosen modes need (cached)."""
    need_bottom = "remove_bottom_freeze" in cfg.modes
    paths: dict[str, Path] = {}
    core = None
    for band, given, name in (("top", cfg.region, "core.safetensors"),
                              ("bottom", cfg.bottom_region, "core_bottom.safetensors")):
        if band == "bottom" and not need_bottom:
            continue
        if given:
            paths[band] = Path(given)
            continue
        if band == "bottom" and cfg.region:
            raise RegionsError("remove_bottom_freeze with a given --region needs --bottom-region "
                               "too (the bottom of which score?)")
        path = out / name
        if not path.exists():
            core = core or _core_importance(model, tok, data, cfg, out)
            select_from_importance(core, band, cfg.ratio).save(path)
        paths[band] = path
    return paths


def _freeze_config(mode: str, paths: dict[str, Path], cfg: FurtherPretrainConfig
                   ) -> FreezeRegionConfig | None:
    if mode == "full":
        return None
    if mode == "soft":
        return FreezeRegionConfig(region=str(paths["top"]), alpha=cfg.alpha,
                                  max_update=cfg.max_update)
    region = paths["bottom"] if mode == "remove_bottom_freeze" else paths["top"]
    return FreezeRegionConfig(region=str(region), alpha=1.0 if mode == "remove_unfreeze" else 0.0,
                              init="zero" if mode.startswith("remove") else "keep")


@torch.no_grad()
def evaluate(model, tok, data, langs, n_train, max_length) -> dict[str, float]:
    model.eval()
    out = {l: perplexity(model, tok, [u["text"] for u in split_units(data[l], n_train)[1]],
                         max_length)["ppl"] for l in langs}
    model.train()
    return out


def _region_values(model, region: Region) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().reshape(-1)[i.long()].clone() for n, i in region.indices.items()}


def run_mode(mode: str, model, tok, data, paths: dict[str, Path], cfg: FurtherPretrainConfig
             ) -> dict[str, Any]:
    """One training run; the model's weights are restored afterwards."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    fcfg = _freeze_config(mode, paths, cfg)
    adapter = FreezeRegionAdapter(model, fcfg, opt) if fcfg else None
    start = _region_values(model, adapter.region) if adapter else None  # after any removal
    langs = [cfg.lang] + [l for l in cfg.eval_langs if l != cfg.lang]
    texts = [u["text"] for u in data[cfg.lang][:cfg.n_train]]
    train = list(batches(tok, texts, cfg.batch_size, cfg.max_length))
    curve = [{"step": 0, "ppl": evaluate(model, tok, data, langs, cfg.n_train, cfg.max_length)}]
    t0 = time.time()
    model.train()
    for step in range(1, cfg.steps + 1):
        loss = model(**train[(step - 1) % len(train)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append({"step": step, "loss": float(loss.detach()),
                          "ppl": evaluate(model, tok, data, langs, cfg.n_train, cfg.max_length)})
            print(f"[{mode}] step {step} loss {float(loss.detach()):.3f} ppl "
                  + " ".join(f"{l}={v:.1f}" for l, v in curve[-1]["ppl"].items()), flush=True)
    drift = max_abs = None
    if adapter is not None:
        adapter.remove()
        end = _region_values(model, adapter.region)
        drift = max(float((end[n] - start[n]).abs().max()) for n in end)
        max_abs = max(float(v.abs().max()) for v in end.values())
    model.eval()
    with torch.no_grad():  # next mode starts from the same weights
        for n, p in model.named_parameters():
            p.copy_(state[n])
    return {"mode": mode, "paper_label": PAPER_LABELS.get(mode), "curve": curve,
            "train_seconds": time.time() - t0, "region": str(fcfg.region) if fcfg else None,
            "init": fcfg.init if fcfg else None, "max_abs_change_in_region": drift,
            "max_abs_value_in_region": max_abs,
            "adapter_bytes": adapter.memory_bytes() if adapter else None}


def plot(result: dict, path: Path) -> None:
    langs = list(result["runs"][0]["curve"][0]["ppl"])
    fig, axes = subplots(1, len(langs), figsize=(3.2 * len(langs), 3), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for run in result["runs"]:
            ax.plot([c["step"] for c in run["curve"]], [c["ppl"][lang] for c in run["curve"]],
                    marker="o", label=run["paper_label"] or run["mode"])
        ax.set_title(f"{lang}{' (target)' if lang == result['config']['lang'] else ''}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("perplexity (held-out UDHR)")
    axes[0][0].legend()
    save_figure(fig, path)


def run_further_pretrain(cfg: FurtherPretrainConfig, model=None, tokenizer=None,
                         data: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """Run every mode of ``cfg``; writes ``result.json`` (after each run) and ``curves.png``.

    ``model``/``tokenizer``/``data`` (UDHR ``lang -> units``) default to ``cfg.model`` and the
    UDHR file."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    data = data if data is not None else load_parallel()
    for lang in [cfg.lang, *cfg.eval_langs]:
        if lang not in data:
            raise RegionsError(f"language '{lang}' is not in the UDHR data: {sorted(data)}")
    t0 = time.time()
    paths = regions_for(model, tokenizer, data, cfg, out)
    sizes = {band: Region.load(p, model).numel() for band, p in paths.items()}
    result = {"config": asdict(cfg), "regions": {b: {"path": str(p), "numel": sizes[b]}
                                                 for b, p in paths.items()},
              "region_seconds": time.time() - t0, "runs": []}
    for mode in cfg.modes:
        result["runs"].append(run_mode(mode, model, tokenizer, data, paths, cfg))
        write_text_atomic(out / "result.json", json.dumps(result, indent=2))
    plot(result, out / "curves.png")
    return result


def main(argv=None) -> int:
    d = FurtherPretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--lang", default=d.lang)
    p.add_argument("--eval-langs", nargs="+", default=list(d.eval_langs))
    p.add_argument("--mode", nargs="+", default=list(d.modes), choices=MODES)
    p.add_argument("--region", help="Top region .safetensors (default: the core region)")
    p.add_argument("--bottom-region", help="Bottom region (default: Bottom of the core score)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="core region size per matrix")
    for name in ("steps", "eval_every", "warmup", "batch_size", "max_length", "n_train"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "max_grad_norm", "alpha"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--max-update", type=float, default=None, help="soft mode: per-entry clamp")
    p.add_argument("--out", default=d.out)
    args = vars(p.parse_args(argv))
    args["modes"] = tuple(args.pop("mode"))
    try:
        result = run_further_pretrain(FurtherPretrainConfig(**args))
    except RegionsError as e:
        print(f"further_pretrain: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({r["mode"]: r["curve"][-1]["ppl"] for r in result["runs"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
