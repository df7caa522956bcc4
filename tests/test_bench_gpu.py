"""benchmarks/bench_gpu.py: without CUDA it refuses clearly; its whole pipeline runs as a CPU dry
run on a tiny Llama (the logic a GPU run takes; no GPU figure comes from it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_fails_clearly(capsys):
    bench = _module()
    assert bench.main(["--size", "7b"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert bench.main(["--size", "7b", "--device", "cpu"]) == 2  # CPU only for the tiny dry run
    assert "--size tiny" in capsys.readouterr().err
    assert bench.SIZES["7b"] == (4096, 11008, 32, 32, 32)  # LLaMA-2-7B's block shape


@pytest.mark.slow
def test_cpu_dry_run_of_the_whole_pipeline(tmp_path):
    out = tmp_path / "tiny.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny",
                        "--batches", "2", "--batch", "2", "--seq", "32", "--eval-docs", "4",
                        "--eval-words", "40", "--act-samples", "3", "--steps", "2", "--reps", "1",
                        "--dir", str(tmp_path), "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["device"].startswith("cpu (dry run")
    for key in ("baseline_forward", "baseline_forward_backward",
                "importance_float32_accumulators", "importance_bfloat16_accumulators"):
        assert rep[key]["tokens"] == 2 * 2 * 32 and rep[key]["tokens_per_s"] > 0, key
        assert rep[key]["peak_gpu_gb"] is None  # no GPU figure from a CPU run
    assert rep["importance_float32_accumulators"]["vs_baseline_forward_backward"] > 0
    # Top-1% per matrix of the tiny block weights, from the CLI in its own process
    assert rep["extract_cli"]["selected"] == sum(
        max(1, int(0.01 * n)) for n in (64 * 64, 64 * 32, 64 * 32, 64 * 64,
                                        128 * 64, 128 * 64, 64 * 128)) * 2
    assert rep["extract_cli"]["peak_rss_mb"] > 0
    assert rep["eval"]["region_changed_perplexity"]  # hf-regions applied the region
    assert set(rep["eval"]["tokens_per_s"]) == {"hf", "hf-regions"}
    assert rep["activations"]["samples"] == 6 and rep["activations"]["capture_time_ratio"] > 0
    assert rep["freeze"]["region_unchanged"] and rep["freeze"]["region_entries"] == \
        rep["extract_cli"]["selected"]
    assert not list(tmp_path.glob("bench_gpu_*"))  # large files removed
