"""Issue 14 item 2 (bad scores are refused, never ranked) and item 8 (sums in bounded memory).

A NaN ranks as the largest score (it lands in every Top region; an all-NaN matrix gives
identical Top and Bottom), ±inf and negative entries cannot come from any of our criteria:
each is an error naming the parameter and the count, on every path that reads scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, random_batches, tiny_model

from lmeval_regions.cli import main
from lmeval_regions.errors import ArtefactError
from lmeval_regions.importance import (
    CRITERIA,
    NON_NEGATIVE,
    Importance,
    combine,
    combine_files,
    compute_importance,
    lazy_scores,
)
from lmeval_regions.regions import select, select_file
from lmeval_regions.regions.ranking import SORT_LIMIT, select_window

BAD = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scores")
    imp = compute_importance(tiny_model("llama"), random_batches(), languages=["en"],
                             progress=False)
    imp.save(d / "good.safetensors")
    return d / "good.safetensors"


def corrupt(good: Path, out: Path, value: float, count: int, dtype=torch.float32) -> Path:
    imp = Importance.load(good)
    t = imp.scores[BAD].clone().to(dtype)
    flat = t.view(-1)
    flat[torch.arange(count) * 7] = value  # spread over the matrix
    imp.scores = {n: (t if n == BAD else s.to(dtype)) for n, s in imp.scores.items()}
    imp.save(out)
    return out


CASES = [("nan", float("nan"), r"3 non-finite entries of 2048 \(3 NaN, 0 \+inf, 0 -inf\)"),
         ("+inf", float("inf"), r"3 non-finite entries of 2048 \(0 NaN, 3 \+inf, 0 -inf\)"),
         ("-inf", float("-inf"), r"3 non-finite entries of 2048 \(0 NaN, 0 \+inf, 3 -inf\)"),
         ("negative", -1e-3, r"3 negative entries of 2048 \(min -0.001\)")]


def test_every_criterion_is_non_negative():
    assert set(NON_NEGATIVE) == set(CRITERIA)


@pytest.mark.parametrize("name,value,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("path", ["Importance.load", "select_file", "lazy_scores"])
def test_bad_scores_are_refused_naming_parameter_and_count(good, tmp_path, name, value,
                                                           message, path):
    bad = corrupt(good, tmp_path / "bad.safetensors", value, 3)
    with pytest.raises(ArtefactError) as e:
        if path == "Importance.load":
            Importance.load(bad)
        elif path == "select_file":
            select_file(bad, "top", 0.01)
        else:
            dict(lazy_scores(bad))  # reads every tensor
    text = str(e.value)
    assert str(bad) in text and f"'{BAD}'" in text
    import re
    assert re.search(message, text), text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bad_scores_found_in_bf16_too(good, tmp_path, dtype):
    bad = corrupt(good, tmp_path / "bad.safetensors", float("nan"), 5, dtype)
    with pytest.raises(ArtefactError, match="5 non-finite entries"):
        select_file(bad, "bottom", 0.01, scope="global")


def test_all_nan_matrix_would_give_identical_top_and_bottom(good, tmp_path):
    """The silent failure the check prevents: ranked without it, an all-NaN matrix gives the
    same Top and Bottom entries; with it, select_file refuses the file."""
    imp = Importance.load(good)
    imp.scores[BAD] = torch.full_like(imp.scores[BAD], float("nan"))
    top = select(imp.scores, "top", 0.01, names=[BAD])
    bottom = select(imp.scores, "bottom", 0.01, names=[BAD])
    assert torch.equal(top.indices[BAD], bottom.indices[BAD])  # why it must be refused
    imp.save(tmp_path / "nan.safetensors")
    with pytest.raises(ArtefactError, match="2048 non-finite entries of 2048"):
        select_file(tmp_path / "nan.safetensors", "top", 0.01)


def test_zeros_and_ties_are_fine(good, tmp_path):
    """No false alarm: exact zeros (a quantised model's) and ties are valid scores."""
    imp = Importance.load(good)
    imp.scores[BAD] = torch.zeros_like(imp.scores[BAD])
    imp.save(tmp_path / "zeros.safetensors")
    assert Importance.load(tmp_path / "zeros.safetensors").scores[BAD].sum() == 0
    assert select_file(tmp_path / "zeros.safetensors", "bottom", 0.01).numel() > 0


@pytest.mark.parametrize("cmd", ["extract", "combine", "monolingual"])
def test_cli_refuses_bad_scores_and_writes_nothing(good, tmp_path, capsys, cmd):
    bad = corrupt(good, tmp_path / "bad.safetensors", float("nan"), 2)
    out = tmp_path / "out.safetensors"
    other = tmp_path / "other.safetensors"
    imp = Importance.load(good)
    imp.languages = ["fr"]
    imp.save(other)
    argv = {"extract": ["extract", "--importance", bad, "--out", out],
            "combine": ["combine", other, bad, "--out", out],
            "monolingual": ["monolingual", "--importance", f"fr={other},en={bad}",
                            "--out-dir", tmp_path / "mono"]}[cmd]
    before = bad.read_bytes()
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"'{BAD}'" in err and "2 non-finite entries" in err
    assert not out.exists() and not list(tmp_path.glob("mono/*.safetensors"))
    assert bad.read_bytes() == before


def test_each_tensor_is_checked_once_even_when_read_again(good):
    """The exhaustive ranking reads each tensor two or three times; the check runs once."""
    scores = lazy_scores(good)
    names = list(scores)
    calls, marked = [], []
    check = scores.validate
    scores.validate = lambda n, t: (calls.append(n), check(n, t))
    scores.progress = marked.append
    select_window(scores.__getitem__, names, {n: math.prod(scores.shapes[n]) for n in names},
                  0, 10, False)
    assert sorted(calls) == sorted(names) and sorted(marked) == sorted(names)
    select(scores, "bottom", 0.01, scope="global")  # read again: nothing is checked twice
    assert len(calls) == len(names) and len(marked) == len(names)


def _big(good: Path, out: Path, dtype, value: float | None = None, at: int = 0) -> Path:
    """``good`` plus a 64k-entry matrix (ranked by the one-pass band: above the sort limit),
    ``value`` written at 3 entries from flat position ``at``."""
    imp = Importance.load(good)
    big = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert big.numel() > SORT_LIMIT
    if value is not None:
        big.view(-1)[at:at + 3 * 1000:1000] = value
    imp.scores = {**{n: t.to(dtype) for n, t in imp.scores.items()}, "big": big}
    imp.save(out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_the_band_pass_stands_in_for_the_check_and_refuses_the_same(good, tmp_path, dtype,
                                                                    scope):
    """Ranked by the one-pass band, a tensor's values are checked in that pass, not in a
    second one: good scores never reach ``validate`` yet are marked checked; every bad value
    (in any 64-entry block, or the tail) still gets check_scores' own error."""
    path = _big(good, tmp_path / "big.safetensors", dtype)
    scores = lazy_scores(path)
    calls, marked = [], []
    check = scores.validate
    scores.validate = lambda n, t: (calls.append(n), check(n, t))
    scores.progress = marked.append
    want = select(Importance.load(path).scores, "top", 0.01, scope=scope)
    got = select(scores, "top", 0.01, scope=scope)
    assert all(torch.equal(got.indices[n], want.indices[n]) for n in want.indices)
    assert "big" in marked and "big" not in calls and sorted(marked) == sorted(scores)
    for value, message in [(float("nan"), r"3 non-finite entries of 65536 \(3 NaN"),
                           (float("-inf"), r"3 non-finite entries of 65536 \(0 NaN, 0 \+inf, 3"),
                           (-0.5, r"3 negative entries of 65536")]:
        for at in (0, 65536 - 2001):  # from the first entry; to the last one
            bad = _big(good, tmp_path / "bad.safetensors", dtype, value, at)
            with pytest.raises(ArtefactError, match=message) as e:
                select_file(bad, "top", 0.01, scope=scope)
            assert "'big'" in str(e.value)


# ---- sums in bounded memory ------------------------------------------------------------------

def _parts(tmp: Path, n: int = 3) -> list[Path]:
    paths = []
    for i, lang in enumerate(["ar", "es", "ru", "zh"][:n]):
        imp = compute_importance(tiny_model("llama"), random_batches(seed=i), languages=[lang],
                                 progress=False)
        imp.extra["batch_size"] = 2
        imp.save(tmp / f"imp.{lang}.safetensors")
        paths.append(tmp / f"imp.{lang}.safetensors")
    return paths


def test_combine_files_equals_combine_in_memory(tmp_path):
    paths = _parts(tmp_path)
    meta = combine_files(paths, tmp_path / "sum.safetensors")
    got = Importance.load(tmp_path / "sum.safetensors")
    parts = [Importance.load(p) for p in paths]
    ref = combine(parts)
    assert list(got.scores) == list(ref.scores)
    for n in ref.scores:  # the same fp32 additions in the same order
        assert torch.equal(got.scores[n], parts[0].scores[n] + parts[1].scores[n]
                           + parts[2].scores[n])
    for field in ("languages", "n_sequences", "n_tokens", "n_skipped", "sources", "criterion",
                  "snapshot", "model"):
        assert getattr(got, field) == getattr(ref, field) == getattr(meta, field), field
    assert got.extra["combined_from"] == [["ar"], ["es"], ["ru"]]
    assert got.extra["layouts"] == parts[0].extra["layouts"]


def test_combine_refuses_different_criteria_naming_both(tmp_path):
    paths = _parts(tmp_path, 2)
    imp = Importance.load(paths[1])
    imp.criterion = "fisher"
    imp.save(paths[1])
    with pytest.raises(ArtefactError) as e:
        combine_files(paths, tmp_path / "sum.safetensors")
    assert str(paths[0]) in str(e.value) and str(paths[1]) in str(e.value)
    assert "'sum_abs'" in str(e.value) and "'fisher'" in str(e.value)
    assert not (tmp_path / "sum.safetensors").exists()


_PEAK = r'''
import json, sys, torch
from lmeval_regions.importance import Importance, combine, combine_files


def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


mode, folder = sys.argv[1], sys.argv[2]
paths = [f"{folder}/imp.{i}.safetensors" for i in range(4)]
torch.ones(1)
# one-time costs outside the measure: numba's import and the score check's compilation
from lmeval_regions.importance import check_scores
check_scores("w", torch.ones(4), "warm-up", "sum_abs")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS")
if mode == "stream":
    combine_files(paths, f"{folder}/sum.safetensors")
else:
    combine([Importance.load(p) for p in paths]).save(f"{folder}/sum.safetensors")
print(json.dumps({"before_kb": before, "after_kb": status("VmHWM")}))
'''


def test_combine_of_files_holds_one_tensor_per_file(tmp_path):
    """Four files of 4 x 16 MB tensors (256 MB in all): streaming combine's peak memory grows
    by a few tensors (peak RSS, VmHWM, in a fresh process), while loading every file and
    summing in memory, the control, grows by at least the inputs' total."""
    from lmeval_regions.artefacts import model_fingerprint

    shapes = {f"model.layers.{l}.mlp.down_proj.weight": [2048, 2048] for l in range(4)}
    fp = model_fingerprint(shapes)
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        Importance({n: torch.rand(s, generator=g) for n, s in shapes.items()}, "sum_abs", fp,
                   languages=[f"l{i}"]).save(tmp_path / f"imp.{i}.safetensors")
    mb = {}
    for mode in ("stream", "memory"):
        res = subprocess.run([sys.executable, "-c", _PEAK, mode, str(tmp_path)], check=True,
                             capture_output=True, text=True,
                             # a fixed mmap threshold: freed tensors leave RSS at once
                             # (glibc's dynamic one keeps them in the heap)
                             env={**os.environ, "PYTHONPATH": str(REPO),
                                  "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"})
        doc = json.loads(res.stdout.strip().splitlines()[-1])
        mb[mode] = (doc["after_kb"] - doc["before_kb"]) / 1024
    print(f"peak RSS growth, MB: {mb}")
    tensor_mb = 2048 * 2048 * 4 / 2**20  # 16 MB
    assert mb["stream"] < 6 * tensor_mb, mb       # 4 inputs + the sum + slack: 96 MB
    assert mb["memory"] > 16 * tensor_mb, mb      # every input held: >= 256 MB
