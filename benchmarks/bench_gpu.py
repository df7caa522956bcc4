"""GPU ratios on a randomly initialised Llama config (1B-3B): importance overhead and
region-eval throughput, measured side by side in one run.

    python benchmarks/bench_gpu.py                       # ~1.2B (TinyLlama-like shape), bf16
    python benchmarks/bench_gpu.py --size 3b             # ~3.2B (Llama-3.2-3B-like shape)

Reports (JSON, ``benchmarks/results/bench_gpu_<size>.json``):
- ``importance_overhead``: time of a forward+backward step with fp32 / bf16 importance
  accumulation (``ImportanceAccumulator.accumulate``) over the same step without it;
- ``region_eval_ratio``: forward throughput (tokens/s) with a Top-1% region zeroed through
  ``interventions.Editor`` over the plain model (should be ~1: edits are in place), and the
  one-off cost of applying + restoring the region;
- peak GPU memory of each configuration.
Exits with status 2 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 5632, 22, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
}


def build(size: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    h, i, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.eval()


def timed(fn, reps: int) -> float:
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; nothing measured (run this on a GPU machine)",
              file=sys.stderr)
        return 2

    from lmeval_regions.models import block_parameters
    from lmeval_regions.artefacts import write_text_atomic
    from lmeval_regions.importance import ImportanceAccumulator
    from lmeval_regions.interventions import Editor
    from lmeval_regions.regions import select

    model = build(args.size, torch.bfloat16)
    params = block_parameters(model)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params.values()))
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
    report = {"device": torch.cuda.get_device_name(), "size": args.size,
              "n_params": sum(p.numel() for p in model.parameters()),
              "n_block_params": sum(p.numel() for p in params.values()),
              "batch": args.batch, "seq": args.seq, "model_dtype": "bfloat16"}

    def step(acc=None):
        model(input_ids=ids, labels=ids).loss.backward()
        if acc is not None:
            acc.accumulate()
        for p in params.values():
            p.grad = None

    results = {}
    for name, dtype in (("plain", None), ("fp32_acc", "float32"), ("bf16_acc", "bfloat16")):
        acc = ImportanceAccumulator(params, "abs_sum", dtype) if dtype else None
        torch.cuda.reset_peak_memory_stats()
        sec = timed(lambda: step(acc), args.reps)
        results[name] = {"seconds_per_step": sec,
                         "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}
        scores = acc.result() if acc is not None else None
        del acc
    report["importance"] = results
    report["importance_overhead"] = {k: results[k]["seconds_per_step"] / results["plain"]["seconds_per_step"]
                                     for k in ("fp32_acc", "bf16_acc")}

    # region eval: forward throughput with a Top-1% region zeroed in place vs. plain
    region = select({n: s.cpu() for n, s in scores.items()}, "top", 0.01, scope="matrix")
    del scores
    tokens = args.batch * args.seq

    @torch.no_grad()
    def fwd():
        model(input_ids=ids)

    plain = timed(fwd, args.reps)
    ed = Editor(model)
    torch.cuda.synchronize()
    t = time.perf_counter()
    ed.apply(region, "zero")
    torch.cuda.synchronize()
    apply_s = time.perf_counter() - t
    edited = timed(fwd, args.reps)
    t = time.perf_counter()
    ed.restore()
    torch.cuda.synchronize()
    restore_s = time.perf_counter() - t
    report["region_eval"] = {"plain_tokens_per_s": tokens / plain,
                             "region_tokens_per_s": tokens / edited,
                             "apply_seconds": apply_s, "restore_seconds": restore_s,
                             "region_entries": region.numel()}
    report["region_eval_ratio"] = plain / edited
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_gpu_{args.size}.json")
    write_text_atomic(out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
