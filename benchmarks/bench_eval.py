"""Perplexity throughput of ``hf-regions`` (a region applied) vs lm-eval's own ``hf``.

Both models are loaded once, then evaluated alternately (ABAB...) on the same local
``loglikelihood_rolling`` task through ``lm_eval.simple_evaluate``; the ratio is
median(hf seconds) / median(hf-regions seconds) (>= 1 means ours is as fast). The region is
applied once at load time, so a forward pass should cost exactly what ``hf``'s does.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_eval.py \
        --model gemma-3-270m --docs 4 --chars 500 --reps 2 --out benchmarks/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lm_eval_helpers import TASK, write_ppl_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--chars", type=int, default=1200, help="characters per document")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.01, help="size of the random region")
    ap.add_argument("--out", default="benchmarks/bench_eval.json")
    a = ap.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmeval_regions.artefacts import write_text_atomic
    from lmeval_regions.corpora import load_parallel
    from lmeval_regions.lm import HFRegionsLM
    from lmeval_regions.models import resolve_pretrained
    from lmeval_regions.regions import select

    langs = ["en", "fr", "ru", "zh", "ar", "es", "ko", "vi"]
    data = load_parallel(None, langs)
    texts = [data[langs[i % len(langs)]][i // len(langs)]["text"][:a.chars] for i in range(a.docs)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    manager = TaskManager(include_path=str(write_ppl_task(tmp / "tasks", texts)),
                          include_defaults=False)

    path = resolve_pretrained(a.model)
    common = {"pretrained": path, "dtype": "float32", "device": "cpu", "batch_size": 1}
    hf = HFLM(**common)
    shapes = {n: p for n, p in hf.model.named_parameters() if ".layers." in n and p.dim() == 2}
    region = select({n: torch.zeros(p.shape) for n, p in shapes.items()}, "random", a.ratio, seed=0)
    region.save(tmp / "random.safetensors")
    ours = HFRegionsLM(**common, region=str(tmp / "random.safetensors"))
    n_tokens = sum(len(hf.tok_encode(t)) for t in texts)

    times: dict[str, list[float]] = {"hf": [], "hf-regions": []}
    ppl = {}
    for rep in range(a.reps + 1):  # rep 0 warms up both, not counted
        for name, lm in (("hf", hf), ("hf-regions", ours)) if rep % 2 == 0 else (
                ("hf-regions", ours), ("hf", hf)):
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager,
                                          batch_size=1, device="cpu")
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            ppl[name] = res["results"][TASK]["word_perplexity,none"]
            print(f"rep {rep} {name}: {dt:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": a.model, "docs": a.docs, "tokens": n_tokens, "reps": a.reps,
        "region_entries": region.numel(), "threads": torch.get_num_threads(),
        "seconds": times, "median_seconds": med,
        "tokens_per_second": {k: n_tokens / v for k, v in med.items()},
        "throughput_ratio_ours_over_hf": med["hf"] / med["hf-regions"],
        "word_perplexity": ppl,
    }
    write_text_atomic(a.out, json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("tokens", "median_seconds",
                                           "throughput_ratio_ours_over_hf")}, indent=1))


if __name__ == "__main__":
    main()
