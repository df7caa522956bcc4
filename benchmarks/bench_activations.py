"""Activation capture throughput vs a plain forward pass on the same batches.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_activations.py [--model tiny|gemma-3-270m]
      [--out benchmarks/results/activations.json]

Both paths see identical batches, interleaved (plain, capture, plain, capture, ...) in one run
so machine load hits both alike; the ratio is plain time / capture time (>= 0.9 required:
capture at least 90% of plain throughput). Capture includes pooling, the copy to CPU and the
streamed write of the artefact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama, or an embedded model")
    ap.add_argument("--units", type=int, default=16, help="UDHR units per language")
    ap.add_argument("--langs", default="en,fr,ar,zh")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/activations.json")
    args = ap.parse_args()

    from lmeval_regions.activations import ActivationConfig, capture
    from lmeval_regions.artefacts import write_text_atomic
    from lmeval_regions.corpora import batches, load_parallel

    if args.model == "tiny-llama":
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from lmeval_regions.models import resolve_pretrained
        tok = AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).eval()
    else:
        from lmeval_regions.models import load_model
        model, tok = load_model(args.model)
    corpus = {l: u[: args.units] for l, u in load_parallel(langs=args.langs.split(",")).items()}
    cfg = ActivationConfig(batch_size=args.batch_size, max_length=args.max_length)

    def plain() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for units in corpus.values():
                for b in batches(tok, [u["text"] for u in units], cfg.batch_size, cfg.max_length):
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return time.perf_counter() - t

    def captured(path: Path) -> float:
        t = time.perf_counter()
        capture(model, tok, corpus, path, cfg)
        return time.perf_counter() - t

    plain()  # warm-up
    tp, tc = [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            tp.append(plain())
            tc.append(captured(Path(d) / f"a{r}.safetensors"))
    n = sum(len(u) for u in corpus.values())
    res = {"model": args.model, "samples": n, "batch_size": cfg.batch_size,
           "max_length": cfg.max_length, "repeats": args.repeats,
           "plain_s": tp, "capture_s": tc,
           "plain_samples_per_s": n / statistics.median(tp),
           "capture_samples_per_s": n / statistics.median(tc),
           "throughput_ratio": statistics.median(tp) / statistics.median(tc),
           "required_ratio": 0.9, "torch_threads": torch.get_num_threads()}
    res["pass"] = res["throughput_ratio"] >= 0.9
    write_text_atomic(args.out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
