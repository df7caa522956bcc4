#!/usr/bin/env python
"""Further pre-training on one language with the core region free, frozen or soft (paper 1 §3.5,
Fig. 5/6): target and non-target perplexity at checkpoints, as JSON and a PNG plot.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/further_pretrain.py \
        --model smollm2-135m --lang ar --steps 12 --lr 3e-4 --mode full freeze soft \
        --out runs/fpt_ar

The core region (top ``--ratio`` per matrix of Σ_l importance over ar/es/ru/zh/ko/vi, first 25
UDHR units each) is computed once and cached as ``<out>/core.safetensors`` unless ``--region``
gives one. Training uses UDHR units 0..24 of ``--lang`` (cycled); evaluation the held-out units
25..49 of ``--lang`` and ``--eval-langs``. Every mode starts from the same weights and sees the
same batches. For lm-eval numbers on the saved checkpoints, see docs/trainer_ext.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmeval_regions.artefacts import write_text_atomic
from lmeval_regions.corpora import batches, load_parallel, split_units
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import ImportanceConfig, combine, compute_importance
from lmeval_regions.models import load_model
from lmeval_regions.paper import PAPER1_TRAIN_LANGS
from lmeval_regions.perplexity import perplexity
from lmeval_regions.regions import Region, select_from_importance
from lmeval_regions.studies.plotting import save_figure, subplots
from lmeval_regions.training import FreezeRegionAdapter, FreezeRegionConfig

MODES = ("full", "freeze", "soft")


def core_region(model, tok, data, ratio: float, n_train: int, max_length: int, out: Path) -> Path:
    path = out / "core.safetensors"
    if path.exists():
        return path
    parts = []
    for lang in PAPER1_TRAIN_LANGS:
        texts = [u["text"] for u in data[lang][:n_train]]
        parts.append(compute_importance(model, batches(tok, texts, 4, max_length), ImportanceConfig(),
                                        languages=[lang], progress=False))
    select_from_importance(combine(parts), "top", ratio).save(path)
    return path


@torch.no_grad()
def evaluate(model, tok, data, langs, n_train, max_length) -> dict[str, float]:
    model.eval()
    out = {l: perplexity(model, tok, [u["text"] for u in split_units(data[l], n_train)[1]],
                         max_length)["ppl"] for l in langs}
    model.train()
    return out


def run_mode(mode, model, tok, data, region_path, args) -> dict:
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    adapter = None
    if mode != "full":
        cfg = FreezeRegionConfig(region=str(region_path), alpha=0.0 if mode == "freeze" else args.alpha,
                                 max_update=args.max_update if mode == "soft" else None)
        adapter = FreezeRegionAdapter(model, cfg, opt)
    langs = [args.lang] + [l for l in args.eval_langs if l != args.lang]
    texts = [u["text"] for u in data[args.lang][:args.n_train]]
    train = list(batches(tok, texts, args.batch_size, args.max_length))
    curve = [{"step": 0, "ppl": evaluate(model, tok, data, langs, args.n_train, args.max_length)}]
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**train[(step - 1) % len(train)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": float(loss),
                          "ppl": evaluate(model, tok, data, langs, args.n_train, args.max_length)})
            print(f"[{mode}] step {step} loss {float(loss):.3f} ppl "
                  + " ".join(f"{l}={v:.1f}" for l, v in curve[-1]["ppl"].items()), flush=True)
    region_drift = None
    if adapter is not None:
        adapter.remove()
        params = dict(model.named_parameters())
        region_drift = max(float((params[n].detach().reshape(-1)[i.long()]
                                  - state[n].reshape(-1)[i.long()]).abs().max())
                           for n, i in adapter.region.indices.items())
    with torch.no_grad():  # next mode starts from the same weights
        for n, p in model.named_parameters():
            p.copy_(state[n])
    return {"mode": mode, "curve": curve, "train_seconds": time.time() - t0,
            "max_abs_change_in_region": region_drift,
            "adapter_bytes": adapter.memory_bytes() if adapter else None}


def plot(result: dict, path: Path) -> None:
    langs = list(result["runs"][0]["curve"][0]["ppl"])
    fig, axes = subplots(1, len(langs), figsize=(3.2 * len(langs), 3), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for run in result["runs"]:
            ax.plot([c["step"] for c in run["curve"]], [c["ppl"][lang] for c in run["curve"]],
                    marker="o", label=run["mode"])
        ax.set_title(f"{lang}{' (target)' if lang == result['args']['lang'] else ''}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("perplexity (held-out UDHR)")
    axes[0][0].legend()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lang", default="ar")
    p.add_argument("--eval-langs", nargs="+", default=["en", "es", "zh", "ru"])
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--region", help="region .safetensors (default: compute the core region)")
    p.add_argument("--ratio", type=float, default=0.05, help="core region size per matrix")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.1, help="soft mode: kept fraction of updates")
    p.add_argument("--max-update", type=float, default=None, help="soft mode: per-entry clamp")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, default=25)
    p.add_argument("--out", default="runs/further_pretrain")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model, tok = load_model(args.model)
        data = load_parallel()
        for lang in [args.lang, *args.eval_langs]:
            if lang not in data:
                raise RegionsError(f"language '{lang}' is not in the UDHR data: {sorted(data)}")
        t0 = time.time()
        region_path = Path(args.region) if args.region else core_region(
            model, tok, data, args.ratio, args.n_train, args.max_length, out)
        region = Region.load(region_path, model)
        result = {"args": vars(args), "region": {"path": str(region_path), "numel": region.numel(),
                  "seconds": time.time() - t0}, "runs": []}
        for mode in args.mode:
            result["runs"].append(run_mode(mode, model, tok, data, region_path, args))
            write_text_atomic(out / "result.json", json.dumps(result, indent=2))
        plot(result, out / "curves.png")
    except RegionsError as e:
        print(f"further_pretrain: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({r["mode"]: r["curve"][-1]["ppl"] for r in result["runs"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
