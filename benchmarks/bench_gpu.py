"""The whole pipeline on one CUDA GPU, on a randomly initialised Llama in bf16, beside the plain
model's own forward / forward+backward over the same batches, in one run:

1. baselines: forward, and forward+backward (block weights requiring gradients, as importance
   has them), no work of ours;
2. importance over the same batches with fp32 and with bf16 (stochastic-rounding) accumulators
   (``compute_importance``: one backward per batch, paper 1's ``sum_abs``), and the artefact
   written (fp32 scores, tensor by tensor);
3. ``lmeval-regions extract`` Top-1% per matrix from that file, as a researcher runs it (a fresh
   process: its wall time and host peak RSS);
4. lm-eval perplexity (``loglikelihood_rolling``) with ``hf`` and with ``hf-regions`` + the
   region, alternated, on the same documents;
5. activation capture (``activations.capture``, pooled MLP activations streamed to disk) beside
   a plain forward over the same batches;
6. AdamW training steps without and with the freeze adapter on the region (checking that the
   region's entries did not move).

Every step records seconds, tokens/s and the peak GPU memory (``torch.cuda.max_memory_allocated``,
reset before the step); ratios are against the plain-model step of the same run.

    python benchmarks/bench_gpu.py --size 7b          # LLaMA-2-7B block shape (32 x 4096/11008)
    python benchmarks/bench_gpu.py --size 1b --batches 16 --seq 1024
    python benchmarks/bench_gpu.py --device cpu --size tiny   # dry run of the logic, no GPU

Sizes (hidden, MLP, layers, heads, kv heads): tiny 64/128/2/4/2 (dry runs), 1b 2048/5632/22/32/4
(TinyLlama), 3b 3072/8192/28/24/8 (Llama-3.2-3B), 7b 4096/11008/32/32/32 (LLaMA-2-7B). The
vocabulary is the tokenizer's (``--tokenizer``, default SmolLM2's 49,152 tokens, the embedded
model): at 7b that is 0.4 B embedding parameters instead of LLaMA-2's 0.26 B.

Disk (``--dir``): the fp32 importance file is 4 bytes per block weight (26 GB at 7b) plus the
region and the activations; everything is deleted at the end unless ``--keep``.

Writes ``benchmarks/results/bench_gpu_<size>.json`` (or ``--out``). Exits with status 2 and a
message when ``--device cuda`` finds no CUDA device; ``--device cpu`` runs only ``--size tiny``
(it checks the logic; its figures are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))               # bench_select.run_cli
sys.path.insert(0, str(HERE.parent / "tests"))  # lm_eval_helpers.write_ppl_task

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "tiny": (64, 128, 2, 4, 2),
    "1b": (2048, 5632, 22, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
    "7b": (4096, 11008, 32, 32, 32),
}
WORDS = ("the of and to in is was for on that with as by at from his her they which people "
         "right freedom every law state shall have person nation country work").split()


class Device:
    """Timing and peak memory on CUDA (synchronised) or, for dry runs, on the CPU."""

    def __init__(self, name: str):
        self.name = name
        self.cuda = torch.device(name).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def measure(self, fn: Callable[[], Any], tokens: int) -> tuple[dict, Any]:
        """``({"seconds", "tokens", "tokens_per_s", "peak_gpu_gb"}, fn())``."""
        self.sync()
        self.reset_peak()
        t = time.perf_counter()
        out = fn()
        self.sync()
        sec = time.perf_counter() - t
        return {"seconds": sec, "tokens": tokens, "tokens_per_s": tokens / sec,
                "peak_gpu_gb": self.peak_gb()}, out


def build(size: str, vocab: int, bos: int | None, eos: int | None, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    h, i, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host copy of the weights
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def token_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": ids.clone()})
    return out


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def block_grads_only(model) -> dict:
    """Only the block weights require gradients (what importance does); returns them."""
    from lmeval_regions.models import block_parameters

    params = block_parameters(model)
    ids = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return params


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from lmeval_regions.importance import ImportanceConfig, compute_importance
    from lmeval_regions.models import resolve_pretrained

    dev = Device(args.device)
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(args.tokenizer))
    model = build(args.size, len(tok), tok.bos_token_id, tok.eos_token_id, args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_", dir=args.dir))
    data = token_batches(args.batches, args.batch, args.seq, len(tok))
    tokens = args.batches * args.batch * args.seq
    params = block_grads_only(model)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if dev.cuda else "cpu (dry run: not a GPU figure)",
        "size": args.size, "shape": dict(zip(("hidden", "intermediate", "layers", "heads",
                                              "kv_heads"), SIZES[args.size])),
        "vocab": len(tok), "n_params": sum(p.numel() for p in model.parameters()),
        "n_block_params": sum(p.numel() for p in params.values()), "model_dtype": "bfloat16",
        "batches": args.batches, "batch": args.batch, "seq": args.seq,
        "torch": torch.__version__}
    try:
        # ---- 1. baselines (after a warm-up: kernels, allocator) ---------------------------
        def fwd():
            with torch.no_grad():
                for b in data:
                    model(input_ids=b["input_ids"].to(args.device))

        def fwd_bwd():
            for b in data:
                model(**{k: v.to(args.device) for k, v in b.items()}).loss.backward()
                for p in params.values():
                    p.grad = None

        fwd_bwd()
        report["baseline_forward"], _ = dev.measure(fwd, tokens)
        report["baseline_forward_backward"], _ = dev.measure(fwd_bwd, tokens)
        base = report["baseline_forward_backward"]["seconds"]

        # ---- 2. importance, fp32 then bf16 accumulators ------------------------------------
        imp_path = work / "importance.safetensors"
        for acc in ("float32", "bfloat16"):
            cfg = ImportanceConfig(criteria=("sum_abs",), dtype=acc)
            step, imp = dev.measure(lambda: compute_importance(model, data, cfg, ["synthetic"],
                                                               progress=False), tokens)
            step["vs_baseline_forward_backward"] = step["seconds"] / base
            if acc == "float32":
                t = time.perf_counter()
                imp.save(imp_path)
                step["save_seconds"] = time.perf_counter() - t
                step["file_gb"] = imp_path.stat().st_size / 2**30
            del imp
            report[f"importance_{acc}_accumulators"] = step
        if dev.cuda:
            torch.cuda.empty_cache()

        # ---- 3. extract from the CLI (fresh process) ----------------------------------------
        from bench_select import run_cli

        report["extract_cli"] = run_cli("matrix", imp_path, args.ratio, keep=True)
        region_path = Path(report["extract_cli"].pop("region"))
        imp_path.unlink()

        # ---- 4. lm-eval perplexity: hf vs hf-regions ----------------------------------------
        report["eval"] = evaluate(args, dev, model, tok, region_path, work)

        # ---- 5. activation capture vs plain forward -----------------------------------------
        report["activations"] = activations(args, dev, model, tok, work)

        # ---- 6. freeze adapter training steps -----------------------------------------------
        report["freeze"] = freeze_steps(args, dev, model, data, region_path)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def evaluate(args, dev: Device, model, tok, region_path: Path, work: Path) -> dict:
    """lm-eval ``loglikelihood_rolling`` over the same documents with ``hf`` and ``hf-regions``
    (the region zeroed), alternated ``--reps`` times after a warm-up of each."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval_helpers import TASK, write_ppl_task

    from lmeval_regions.lm import HFRegionsLM

    docs = texts(args.eval_docs, args.eval_words, seed=1)
    manager = TaskManager(include_path=str(write_ppl_task(work / "tasks", docs)),
                          include_defaults=False)
    common = {"pretrained": model, "tokenizer": tok, "batch_size": args.batch,
              "max_length": args.seq}
    lms = {"hf": HFLM(**common)}
    n_tokens = sum(len(lms["hf"].tok_encode(t)) for t in docs)
    times: dict[str, list[float]] = {"hf": [], "hf-regions": []}
    peaks: dict[str, float | None] = {}
    ppl = {}
    regions_lm = None
    for rep in range(args.reps + 1):  # rep 0 warms both up, not counted
        for name in (("hf", "hf-regions") if rep % 2 == 0 else ("hf-regions", "hf")):
            if name == "hf-regions":  # the region applied in place to the same model
                if regions_lm is None:
                    regions_lm = HFRegionsLM(**common, region=f"{region_path}@zero")
                else:
                    regions_lm.apply_edits(f"{region_path}@zero")
            lm = regions_lm if name == "hf-regions" else lms["hf"]
            step, res = dev.measure(lambda: lm_eval.simple_evaluate(
                model=lm, tasks=[TASK], task_manager=manager, batch_size=args.batch), n_tokens)
            if name == "hf-regions":
                regions_lm.restore_edits()
            if rep:
                times[name].append(step["seconds"])
                peaks[name] = step["peak_gpu_gb"]
            ppl[name] = res["results"][TASK]["word_perplexity,none"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"docs": len(docs), "tokens": n_tokens, "seconds": times,
            "tokens_per_s": {k: n_tokens / v for k, v in med.items()},
            "peak_gpu_gb": peaks, "word_perplexity": ppl,
            "hf_regions_time_ratio": med["hf-regions"] / med["hf"],
            "region_changed_perplexity": ppl["hf"] != ppl["hf-regions"]}


def activations(args, dev: Device, model, tok, work: Path) -> dict:
    """``capture`` (hooks, pooling, streaming to disk) vs a plain forward of the same batches."""
    from lmeval_regions.activations import ActivationConfig, capture
    from lmeval_regions.corpora import batches

    corpus = {lang: [{"id": i, "text": t} for i, t in enumerate(texts(args.act_samples,
                                                                       args.eval_words, s))]
              for s, lang in enumerate(("xx", "yy"))}
    cfg = ActivationConfig(batch_size=args.batch, max_length=args.seq)
    data = [b for units in corpus.values()
            for b in batches(tok, [u["text"] for u in units], cfg.batch_size, cfg.max_length)]
    n_tokens = int(sum(b["attention_mask"].sum() for b in data))

    def plain():
        with torch.no_grad():
            for b in data:
                model(input_ids=b["input_ids"].to(args.device),
                      attention_mask=b["attention_mask"].to(args.device))

    plain()  # warm-up at these shapes
    out = {"samples": sum(len(u) for u in corpus.values()), "tokens": n_tokens}
    out["plain_forward"], _ = dev.measure(plain, n_tokens)
    path = work / "activations.safetensors"
    out["capture"], _ = dev.measure(lambda: capture(model, tok, corpus, path, cfg), n_tokens)
    out["capture"]["file_gb"] = path.stat().st_size / 2**30
    out["capture_time_ratio"] = out["capture"]["seconds"] / out["plain_forward"]["seconds"]
    path.unlink()
    return out


def freeze_steps(args, dev: Device, model, data, region_path: Path) -> dict:
    """AdamW steps over every parameter, plain and then with the freeze adapter on the region;
    checks the region's entries are bit-identical after the adapter's steps."""
    from lmeval_regions.regions import Region
    from lmeval_regions.training import FreezeRegionAdapter

    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    tokens = args.steps * args.batch * args.seq

    def steps():
        for s in range(args.steps):
            b = data[s % len(data)]
            model(**{k: v.to(args.device) for k, v in b.items()}).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps()  # warm-up: allocates the optimizer states
    out = {"optimizer": "AdamW(weight_decay=0.1), states in the model dtype", "steps": args.steps}
    out["plain"], _ = dev.measure(steps, tokens)
    region = Region.load(region_path, model)
    named = dict(model.named_parameters())
    before = {n: named[n].detach().reshape(-1)[i.long().to(named[n].device)].clone()
              for n, i in region.indices.items()}
    adapter = FreezeRegionAdapter(model, region, opt)
    out["freeze_adapter"], _ = dev.measure(steps, tokens)
    out["adapter_memory_bytes"] = adapter.memory_bytes()
    adapter.remove()
    out["region_entries"] = region.numel()
    out["region_unchanged"] = all(
        torch.equal(named[n].detach().reshape(-1)[i.long().to(named[n].device)], before[n])
        for n, i in region.indices.items())
    out["freeze_time_ratio"] = out["freeze_adapter"]["seconds"] / out["plain"]["seconds"]
    model.eval()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (--size tiny only)")
    ap.add_argument("--batches", type=int, default=8, help="batches of importance / baselines")
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--ratio", type=float, default=0.01, help="region: Top ratio per matrix")
    ap.add_argument("--reps", type=int, default=2, help="timed hf / hf-regions evaluations")
    ap.add_argument("--eval-docs", type=int, default=16)
    ap.add_argument("--eval-words", type=int, default=300, help="words per document")
    ap.add_argument("--act-samples", type=int, default=16, help="samples per language")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per variant")
    ap.add_argument("--tokenizer", default="smollm2-135m",
                    help="tokenizer folder or embedded model name (vocabulary of the model)")
    ap.add_argument("--dir", default=None, help="work folder (large files; default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: --device {args.device} but torch sees no CUDA device here; nothing "
              "measured (run it on a GPU machine; --device cpu --size tiny checks the logic)",
              file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu" and args.size != "tiny":
        print("bench_gpu: --device cpu is a dry run of the logic: use --size tiny",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    report = run(args)
    from lmeval_regions.artefacts import write_text_atomic

    out = Path(args.out or HERE / "results" / f"bench_gpu_{args.size}.json")
    write_text_atomic(out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
