"""Further pre-training on one language with the core region free, frozen, soft, or removed
first (paper 1 §3.5 Fig. 5/6, and Table 2): target and non-target perplexity at checkpoints,
as JSON and a PNG plot.

    lmeval-regions further-pretrain --model smollm2-135m --lang ar --steps 12 --lr 3e-4 \
        --modes full,freeze,soft --max-length 128 --out runs/fpt_ar

Modes (every one starts from the same weights and sees the same batches):

=====================  ==================================================================
``full``               no protection (full-parameter training)
``freeze``             the core (Top) region kept bit-identical (Fig. 5/6)
``soft``               the core region's updates scaled by ``alpha`` / clamped
``remove_freeze``      Table 2 ``Top & Freeze``: Top region zeroed, kept at exactly zero
``remove_unfreeze``    Table 2 ``Top & Unfreeze``: Top region zeroed, then trained freely
``remove_bottom_freeze``  Table 2 ``Bottom & Freeze``: Bottom region zeroed, kept at zero
=====================  ==================================================================

The core score (Σ_l importance over the corpus languages, ar/es/ru/zh/ko/vi by default, the
corpus's units of each, paper 1's ``sum_abs`` criterion) is computed once and cached as
``<out>/core_importance.safetensors``; its Top (Bottom) ``ratio`` per matrix is
``core.safetensors`` (``core_bottom.safetensors``) unless ``region`` (``bottom_region``) gives
one. Training uses the same units of ``lang`` (cycled); evaluation the held-out units
(``--eval-start`` 25 on) of ``lang`` and the held-out languages; step 0 is evaluated after the
removal. For lm-eval numbers on saved checkpoints, see docs/trainer_ext.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig, batches
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.importance import Importance, combine, compute_importance
from lmeval_regions.models import ModelConfig, load_model
from lmeval_regions.perplexity import perplexities
from lmeval_regions.regions import Region, check_ratio, select_from_importance
from lmeval_regions.studies.plotting import save_figure, subplots, title

if TYPE_CHECKING:  # transformers' Trainer and peft load when a run trains, not at import
    # (every CLI command imports this module for its flags: ~9 s of start-up otherwise)
    from lmeval_regions.training import FreezeRegionConfig

MODES = ("full", "freeze", "soft", "remove_freeze", "remove_unfreeze", "remove_bottom_freeze")
PAPER_LABELS = {"remove_freeze": "Top & Freeze", "remove_unfreeze": "Top & Unfreeze",
                "remove_bottom_freeze": "Bottom & Freeze"}
"""Paper 1 Table 2's names of the remove-then-train modes."""


@dataclass
class FurtherPretrainConfig:
    """The recipe's own settings (the model, the corpus its core score and training read, and
    the held-out evaluation are the ``model``, ``corpus`` and ``heldout`` configurations)."""

    lang: str = "ar"
    """Training language."""
    modes: tuple[str, ...] = ("full", "freeze", "soft")
    """Runs, each from the same weights: full, freeze, soft, remove_freeze (Top & Freeze),
    remove_unfreeze (Top & Unfreeze), remove_bottom_freeze (Bottom & Freeze)."""
    region: str | None = None
    """Top region .safetensors (default: Top --ratio per matrix of the core score)."""
    bottom_region: str | None = None
    """Bottom region for remove_bottom_freeze (default: Bottom --ratio of the core score)."""
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
    out: str = "runs/further_pretrain"
    """Output folder: result.json, curves.png, cached core regions."""

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        for m in self.modes:
            if m not in MODES:
                raise RegionsError(f"mode '{m}' is not one of {MODES}." + did_you_mean(m, MODES))
        if not self.modes:
            raise RegionsError(f"modes is empty; expected some of {MODES}")
        if self.steps < 1 or self.eval_every < 1:
            raise RegionsError(f"steps={self.steps} and eval_every={self.eval_every} must be >= 1")
        check_ratio(self.ratio)


@dataclass
class _Plan:
    """What one recipe run reads: units per language, which of them train, which evaluate."""

    data: dict[str, list[dict]]
    train: slice
    held: slice
    eval_langs: list[str]
    max_length: int
    batch_size: int
    core_langs: tuple[str, ...]


def _core_importance(model, tok, plan: _Plan, out: Path) -> Importance:
    path = out / "core_importance.safetensors"
    if path.exists():
        return Importance.load(path, model)
    parts = []
    for lang in plan.core_langs:
        texts = [u["text"] for u in plan.data[lang][plan.train]]
        parts.append(compute_importance(model, batches(tok, texts, plan.batch_size,
                                                       plan.max_length),
                                        languages=[lang], progress=False))
    core = combine(parts)
    core.save(path)
    return core


def regions_for(model, tok, plan: _Plan, cfg: FurtherPretrainConfig, out: Path
                ) -> dict[str, Path]:
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
            core = core or _core_importance(model, tok, plan, out)
            select_from_importance(core, band, cfg.ratio).save(path)
        paths[band] = path
    return paths


def _freeze_config(mode: str, paths: dict[str, Path], cfg: FurtherPretrainConfig
                   ) -> FreezeRegionConfig | None:
    from lmeval_regions.training import FreezeRegionConfig

    if mode == "full":
        return None
    if mode == "soft":
        return FreezeRegionConfig(region=str(paths["top"]), alpha=cfg.alpha,
                                  max_update=cfg.max_update)
    region = paths["bottom"] if mode == "remove_bottom_freeze" else paths["top"]
    return FreezeRegionConfig(region=str(region), alpha=1.0 if mode == "remove_unfreeze" else 0.0,
                              init="zero" if mode.startswith("remove") else "keep")


@torch.no_grad()
def evaluate(model, tok, plan: _Plan) -> dict[str, float]:
    """Held-out perplexity of every evaluated language (the model left in train mode)."""
    model.eval()
    texts = {l: [u["text"] for u in plan.data[l][plan.held]] for l in plan.eval_langs}
    out = perplexities(model, tok, texts, plan.max_length, plan.batch_size)["ppl_per_lang"]
    model.train()
    return out


def _region_values(model, region: Region) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().reshape(-1)[i.long()].clone() for n, i in region.indices.items()}


def run_mode(mode: str, model, tok, plan: _Plan, paths: dict[str, Path],
             cfg: FurtherPretrainConfig) -> dict[str, Any]:
    """One training run; the model's weights are restored afterwards."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    from lmeval_regions.training import FreezeRegionAdapter

    fcfg = _freeze_config(mode, paths, cfg)
    adapter = FreezeRegionAdapter(model, fcfg, opt) if fcfg else None
    start = _region_values(model, adapter.region) if adapter else None  # after any removal
    texts = [u["text"] for u in plan.data[cfg.lang][plan.train]]
    train = list(batches(tok, texts, plan.batch_size, plan.max_length))
    curve = [{"step": 0, "ppl": evaluate(model, tok, plan)}]
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
                          "ppl": evaluate(model, tok, plan)})
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
    """Held-out perplexity per checkpoint, one panel per language, one line per mode; the
    model and the recipe's settings in the title."""
    langs = list(result["runs"][0]["curve"][0]["ppl"])
    fig, axes = subplots(1, len(langs), figsize=(max(6.0, 3.2 * len(langs)), 3.4),
                         squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for run in result["runs"]:
            ax.plot([c["step"] for c in run["curve"]], [c["ppl"][lang] for c in run["curve"]],
                    marker="o", label=run["paper_label"] or run["mode"])
        ax.set_title(f"{lang}{' (target)' if lang == result['config']['recipe']['lang'] else ''}")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity (held-out, log scale)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    rec = result["config"]["recipe"]
    title(fig, f"Further pre-training on {rec['lang']}: held-out perplexity per step",
          f"{result.get('model', '?')}; core region Top {100 * rec['ratio']:g}% per matrix; "
          f"{rec['steps']} steps, lr {rec['lr']:g}; modes {', '.join(rec['modes'])}")
    save_figure(fig, path)


def run_further_pretrain(cfg: FurtherPretrainConfig, corpus: CorpusConfig | None = None,
                         heldout: HeldOutConfig | None = None,
                         model_config: ModelConfig | None = None, model=None, tokenizer=None,
                         data: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """Run every mode of ``cfg``; writes ``result.json`` (after each run) and ``curves.png``.

    ``corpus``: the languages of the core score and the units (skip/units) that feed it and
    the training; ``heldout``: the evaluated languages (besides ``cfg.lang``) and units.
    ``model``/``tokenizer`` default to loading ``model_config``; ``data``
    (``lang -> [{"id", "text"}]``) to the corpus's documents."""
    corpus = corpus or CorpusConfig()
    heldout = heldout or HeldOutConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    eval_langs = list(dict.fromkeys([cfg.lang, *heldout.langs(corpus)]))
    needed = list(dict.fromkeys([*corpus.langs, *eval_langs]))
    if data is None:
        data = {l: [{"id": i, "text": t} for i, t in corpus.rows(l)] for l in needed}
    missing = [l for l in needed if l not in data]
    if missing:
        raise RegionsError(f"languages {missing} are not in the corpus: {sorted(data)}")
    train = slice(corpus.skip, corpus.skip + corpus.units)
    stop = None if heldout.eval_units is None else heldout.eval_start + heldout.eval_units
    if train.stop > heldout.eval_start:
        raise RegionsError(f"training units {train.start}..{train.stop - 1} overlap the "
                           f"held-out units from --eval-start {heldout.eval_start}")
    plan = _Plan(data, train, slice(heldout.eval_start, stop), eval_langs, corpus.max_length,
                 corpus.batch_size, corpus.langs)
    if model is None:
        model, tokenizer = load_model(model_config or ModelConfig(device="cpu"))
    t0 = time.time()
    paths = regions_for(model, tokenizer, plan, cfg, out)
    sizes = {band: Region.load(p, model).numel() for band, p in paths.items()}
    result = {"config": {"recipe": asdict(cfg), "corpus": asdict(corpus),
                         "heldout": asdict(heldout)},
              "model": model_config.model if model_config is not None else
              getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
              "regions": {b: {"path": str(p), "numel": sizes[b]} for b, p in paths.items()},
              "region_seconds": time.time() - t0, "runs": []}
    for mode in cfg.modes:
        result["runs"].append(run_mode(mode, model, tokenizer, plan, paths, cfg))
        write_text_atomic(out / "result.json", json.dumps(result, indent=2))
    plot(result, out / "curves.png")
    return result
