"""Data parallelism under a launcher: `accelerate launch` of the `importance` and `activations`
commands on 2 CPU processes (gloo) gives the artefacts of one process; ranks given different
corpora fail together; DDP-wrapped models and commands that run in one process are refused.

`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher;
it spreads CPU processes only through mpirun); `--multi_gpu` goes through torchrun, which starts
two, and on a machine without CUDA our commands join them with gloo. Each test checks that both
ranks ran.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmeval_regions.artefacts import load_artefact
from lmeval_regions.importance import Importance

REPO = Path(__file__).resolve().parent.parent
LANGS = ("en", "fr")
UNITS = 7      # 4 batches of 2 per language: rank 0 takes batches 0, 2; rank 1 takes 1, 3
CRITERIA = ("sum_abs", "abs_sum", "fisher", "wanda")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her they which".split()
    path = tmp_path_factory.mktemp("dp") / "texts.jsonl"
    path.write_text("".join(
        json.dumps({"id": i, "lang": l, "text": " ".join(rng.choice(words)
                                                         for _ in range(5 + 3 * i))}) + "\n"
        for l in LANGS for i in range(UNITS)), encoding="utf-8")
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # one thread everywhere: the two runs then compute each batch identically, and only the
    # order of the sums differs
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _launch(args: list[str]) -> list[str]:
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_port()), "-m", "lmeval_regions.cli", *args]


def _run_both(args: list[str], out: dict[str, Path]) -> dict[str, str]:
    """The command launched on 2 ranks and in one process, side by side; their outputs."""
    cmds = {"dp": _launch([*args, "--out", str(out["dp"])]),
            "single": [sys.executable, "-m", "lmeval_regions.cli", *args, "--out",
                       str(out["single"])]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=_env()) for k, c in cmds.items()}
    logs = {}
    for k, p in procs.items():
        logs[k], _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{k}:\n{logs[k][-4000:]}"
    return logs


def test_importance_launched_on_two_ranks_equals_one_process(tiny_lm_dir, corpus, tmp_path):
    out = {k: tmp_path / k / "imp.safetensors" for k in ("dp", "single")}
    logs = _run_both(["importance", "--model", str(tiny_lm_dir), "--device", "cpu",
                      "--texts", str(corpus), "--langs", ",".join(LANGS), "--units", str(UNITS),
                      "--batch-size", "2", "--criteria", ",".join(CRITERIA), "--snapshots", "6",
                      "--combine", "--quiet"], out)
    assert "rank 0 of 2" in logs["dp"] and "rank 1 of 2" in logs["dp"]
    names = sorted(p.name for p in out["single"].parent.glob("*.safetensors"))
    assert len(names) == 3 * 2 * len(CRITERIA)  # (en, fr, sum) x (snapshot, whole) x criteria
    assert names == sorted(p.name for p in out["dp"].parent.glob("*.safetensors"))
    assert not list(out["dp"].parent.glob("*rank*"))  # one artefact, no per-rank files
    for name in names:
        got, ref = (Importance.load(out[k].with_name(name)) for k in ("dp", "single"))
        assert (got.criterion, got.snapshot, got.languages, got.n_sequences, got.n_tokens,
                got.n_skipped, got.model, got.sources) == \
               (ref.criterion, ref.snapshot, ref.languages, ref.n_sequences, ref.n_tokens,
                ref.n_skipped, ref.model, ref.sources), name
        assert got.extra.get("batch_size") == ref.extra.get("batch_size") == 2
        if "." + LANGS[0] + "." in name:
            assert got.extra["data_parallel"] == {"world_size": 2, "dealing": "round-robin"}
        assert list(got.scores) == list(ref.scores)
        # sum_abs adds SIGNED per-batch terms before |.|: entries whose terms cancel are only
        # determined to the rounding of the terms' magnitudes (Σ_b |θ·g_b| = abs_sum)
        mag = Importance.load(out["single"].with_name(name.replace("sum_abs", "abs_sum")))
        for n, r in ref.scores.items():
            atol = 1e-6 * mag.scores[n] if got.criterion == "sum_abs" else 0.0
            assert bool(((got.scores[n] - r).abs() <= 1e-5 * r.abs() + atol).all()), (name, n)
        if got.criterion != "sum_abs":
            assert all(bool((got.scores[n] > 0).any()) for n in got.scores), name
    imp = Importance.load(out["dp"].with_name("imp.en.abs_sum.n6.safetensors"))
    assert imp.n_sequences == 6  # cumulative snapshot after global batch 2: both ranks' share


def test_activations_launched_on_two_ranks_equal_one_process(tiny_lm_dir, corpus, tmp_path):
    out = {k: tmp_path / k / "acts.safetensors" for k in ("dp", "single")}
    logs = _run_both(["activations", "--model", str(tiny_lm_dir), "--device", "cpu",
                      "--texts", str(corpus), "--langs", ",".join(LANGS), "--units", str(UNITS),
                      "--batch-size", "2", "--quiet"], out)
    assert "rank 0 of 2" in logs["dp"] and "rank 1 of 2" in logs["dp"]
    got, meta_dp = load_artefact(out["dp"], "activations")
    ref, meta = load_artefact(out["single"], "activations")
    assert meta_dp == meta and list(got) == list(ref)
    assert len(ref) == len(LANGS) * UNITS * 3  # mean, active, tokens per sample
    for k, r in ref.items():
        torch.testing.assert_close(got[k], r, rtol=1e-5, atol=0)
    assert all(int(got[f"{l}/{i}.tokens"]) > 0 for l in LANGS for i in range(UNITS))


# ---- in-process checks with torch.multiprocessing (gloo) ------------------------------------

def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist
    from conftest import random_batches, tiny_model

    from lmeval_regions.errors import RegionsError
    from lmeval_regions.importance import compute_importance
    from lmeval_regions.models import data_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_model("llama")
        dp = data_parallel(model)
        assert dp is not None and (dp.rank, dp.world_size) == (rank, 2)
        # the whole corpus on each rank: every rank ends with the one-process importance
        batches = random_batches(5, seed=7)
        got = compute_importance(model, batches, progress=False)
        ref = compute_importance(model, batches, progress=False, data_parallel=False)
        for n in ref.scores:
            torch.testing.assert_close(got.scores[n], ref.scores[n], rtol=1e-5, atol=1e-7)
        assert (got.n_sequences, got.n_tokens) == (ref.n_sequences, ref.n_tokens)
        # each rank given its own batches: refused on both ranks (none hangs)
        try:
            compute_importance(model, random_batches(3, seed=rank), progress=False)
        except RegionsError as e:
            assert "different" in str(e) and "whole corpus" in str(e)
        else:
            raise AssertionError("ranks given different batches were not refused")
        try:
            data_parallel(torch.nn.parallel.DistributedDataParallel(model))
        except RegionsError as e:
            assert "DistributedDataParallel" in str(e)
        else:
            raise AssertionError("a DDP-wrapped model was not refused")
    finally:
        dist.destroy_process_group()


def test_python_api_data_parallel_and_its_refusals():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_port(),), nprocs=2, join=True)


def test_one_process_commands_refuse_a_launcher(monkeypatch, tmp_path, capsys):
    from lmeval_regions.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc = main(["extract", "--importance", str(tmp_path / "imp.safetensors"),
               "--out", str(tmp_path / "r.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "'extract' runs in one process" in err and "2 launched" in err
