"""A CPU run at 7B block scale: a random-initialised Llama with LLaMA-2-7B's block shape
(hidden 4096, MLP 11008, 32 heads) but 2 layers, in bf16, through the command line --
importance with bf16 accumulators, extract Top-1%, hf-regions perplexity on a short text --
with the importance run's peak RSS checked against the memory arithmetic of docs/scale.md
("Memory per parameter"), measured in its own process."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, LAYERS = 4096, 11008, 32, 2
TEXT = ("All human beings are born free and equal in dignity and rights. They are endowed with "
        "reason and conscience and should act towards one another in a spirit of brotherhood.")


def _cli(args: list[str], cwd: Path) -> tuple[float, str]:
    """``lmeval-regions ARGS`` in a fresh process: (its own peak RSS in bytes, its output)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_select import cli_peak  # VmHWM of the process itself, not its parent's RSS

    run = cli_peak(args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run["returncode"] == 0, run["output"][-3000:]
    print(f"  lmeval-regions {args[0]}: {run['seconds']:.0f} s, "
          f"{run['peak_rss_bytes'] / 2**30:.2f} GiB")
    return run["peak_rss_bytes"], run["output"]


@pytest.mark.slow
def test_7b_block_shape_pipeline_on_cpu(smollm_tokenizer, tmp_path):
    import lm_eval
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmeval_regions.importance import Importance
    from lmeval_regions.regions import Region

    tok = smollm_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_all = sum(p.numel() for p in model.parameters())
    shapes = [list(p.shape) for n, p in model.named_parameters()
              if ".layers." in n and p.dim() == 2]
    n_block = sum(math.prod(s) for s in shapes)
    largest = max(math.prod(s) for s in shapes)
    assert n_block == LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)  # 7B's block matrices
    folder = tmp_path / "llama7b_2l"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    print(f"\n  built and saved the model: {time.perf_counter() - t:.0f} s")
    (tmp_path / "text.txt").write_text(TEXT + "\n" + TEXT[::-1] + "\n", encoding="utf-8")

    # ---- importance (bf16 accumulators), its peak RSS in its own process ----------------------
    startup, _ = _cli(["importance", "--help"], tmp_path)  # interpreter + torch + the package
    common = ["--model", str(folder), "--device", "cpu", "--dtype", "bfloat16"]
    peak, log = _cli(["importance", *common, "--texts", "text.txt", "--langs", "en",
                      "--units", "2", "--max-length", "32", "--batch-size", "2",
                      "--accumulator-dtype", "bfloat16", "--out", "imp.safetensors", "--quiet"],
                     tmp_path)
    imp = Importance.load(tmp_path / "imp.safetensors")
    assert imp.extra["accumulator_dtype"] == "bfloat16" and imp.n_sequences == 2
    assert all(t.dtype == torch.bfloat16 for t in imp.scores.values())
    assert sum(t.numel() for t in imp.scores.values()) == n_block
    assert all(bool((t > 0).any()) for t in imp.scores.values())
    del imp
    # docs/scale.md, "Memory per parameter", one process, bf16 model, bf16 accumulators:
    # weights 2 B x every parameter; per scored (block) entry: gradient 2 B + accumulator 2 B
    # (at the end the accumulators become the bf16 scores in place, the gradients are gone);
    # plus, while one matrix is accumulated, its bf16 product (2 B), its fp32 product, the fp32
    # sum and the int32 random bits (12 B). Activations at 2 x 32 tokens are a few MB; the
    # score file is written tensor by tensor.
    predicted = 2 * n_all + (2 + 2) * n_block + (2 + 12) * largest
    slack = 256 * 2**20  # allocator fragmentation, tokenizer, corpus: not per parameter
    print(f"importance peak RSS {peak / 2**30:.2f} GiB = {peak / n_all:.2f} B per parameter "
          f"({n_all / 1e6:.0f} M parameters, {n_block / 1e6:.0f} M scored); start-up "
          f"{startup / 2**30:.2f} GiB; predicted {predicted / n_all:.2f} B per parameter "
          f"above start-up ({(startup + predicted) / 2**30:.2f} GiB in all)")
    assert peak <= startup + predicted + slack, (peak, startup, predicted)

    # ---- extract Top-1% per matrix -------------------------------------------------------------
    extract_peak, _ = _cli(["extract", "--importance", "imp.safetensors", "--method", "top",
                            "--ratio", "0.01", "--out", "top1.safetensors", "--quiet"], tmp_path)
    region = Region.load(tmp_path / "top1.safetensors")
    assert region.numel() == sum(math.floor(0.01 * math.prod(s)) for s in shapes)
    # bounded: one bf16 score matrix and its selection temporaries, plus the region's int32
    # indices -- never the whole importance (2 B x n_block)
    print(f"extract peak RSS {extract_peak / 2**30:.2f} GiB; whole importance "
          f"{2 * n_block / 2**30:.2f} GiB")
    assert extract_peak < startup + 2 * n_block

    # ---- hf-regions perplexity on a short text ------------------------------------------------
    sys.path.insert(0, str(Path(__file__).parent))
    from lm_eval.tasks import TaskManager
    from lm_eval_helpers import TASK, write_ppl_task

    t = time.perf_counter()
    manager = TaskManager(include_path=str(write_ppl_task(tmp_path / "tasks", [TEXT])),
                          include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="hf-regions", tasks=[TASK], task_manager=manager, batch_size=1, device="cpu",
        model_args={"pretrained": str(folder), "dtype": "bfloat16",
                    "region": str(tmp_path / "top1.safetensors")})
    ppl = res["results"][TASK]["word_perplexity,none"]
    print(f"  hf-regions perplexity {ppl:.4g}: {time.perf_counter() - t:.0f} s")
    edits = res["config"]["regions"]["edits"]
    assert math.isfinite(ppl) and ppl > 1
    assert edits[0]["entries"] == region.numel() and edits[0]["intervention"] == "zero"
