#!/usr/bin/env python
"""Step-time overhead of ImportanceCallback and of the freeze adapter (5% region) under
``transformers.Trainer``, measured side by side in one run, plus the adapter's memory.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py --out bench_trainer.json

Model: a Llama config (default 4 layers, hidden 256, MLP 1024, vocab 2048; random init) — same
architecture family as SmolLM2 but small enough for a 2-core CPU. Each round runs the three
variants (baseline / +ImportanceCallback / +FreezeRegionCallback) in rotating order from the same
initial weights; the reported time per step is the median over rounds of
``train_runtime / max_steps`` after a warm-up round. Targets: callback <= 1.05x, freeze <= 1.10x.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # trainer_ext from a checkout

from lmeval_regions.artefacts import model_fingerprint, write_text_atomic
from lmeval_regions.models import block_parameters
from lmeval_regions.regions import select
from trainer_ext import FreezeRegionCallback, FreezeRegionConfig, ImportanceCallback


class Rand(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.ids[i].clone()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--out", default="bench_trainer.json")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=a.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    init = {n: t.clone() for n, t in model.state_dict().items()}
    params = block_parameters(model, include_norms=True)
    g = torch.Generator().manual_seed(1)
    region = select({n: torch.rand(q.shape, generator=g) for n, q in params.items()}, "top",
                    a.ratio, model=model_fingerprint(model))
    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    region.save(tmp / "region.safetensors")
    ds = Rand(a.batch * a.steps, a.seq, a.vocab)
    freeze_cbs = []

    def callbacks(variant):
        if variant == "importance":
            return [ImportanceCallback(output=tmp / "imp.safetensors")]
        if variant == "freeze":
            freeze_cbs.append(FreezeRegionCallback(
                FreezeRegionConfig(str(tmp / "region.safetensors"))))
            return [freeze_cbs[-1]]
        return []

    def run(variant) -> float:
        model.load_state_dict(init)
        args = TrainingArguments(output_dir=str(tmp / variant), use_cpu=True, report_to=[],
                                 per_device_train_batch_size=a.batch, max_steps=a.steps,
                                 learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0,
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True)
        t = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks(variant))
        t0 = time.perf_counter()
        t.train()
        return (time.perf_counter() - t0) / a.steps

    variants = ["baseline", "importance", "freeze"]
    times = {v: [] for v in variants}
    for v in variants:  # warm-up
        run(v)
    for r in range(a.rounds):
        for v in variants[r % 3:] + variants[:r % 3]:
            times[v].append(run(v))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    mem = freeze_cbs[-1].adapter.memory_bytes()
    k = region.numel()
    n_params = sum(q.numel() for q in model.parameters())
    result = {
        "config": vars(a), "params": n_params, "region_entries": k,
        "seconds_per_step": med, "all_seconds_per_step": times,
        "ratio_importance": med["importance"] / med["baseline"],
        "ratio_freeze": med["freeze"] / med["baseline"],
        "adapter_memory_bytes": mem,
        "region_bytes_int64_idx_plus_fp32_values": k * (8 + 4),
        "adapter_bytes_per_region_entry": mem["total"] / k,
        "adapter_bytes_over_model_fp32_bytes": mem["total"] / (4 * n_params),
        "importance_buffer_bytes": 4 * sum(q.numel() for q in block_parameters(model).values()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    write_text_atomic(a.out, json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("seconds_per_step", "ratio_importance", "ratio_freeze",
                                             "adapter_memory_bytes", "region_entries")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
