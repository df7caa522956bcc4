"""`extract` and `monolingual` read importance artefacts tensor by tensor (several files summed
one parameter at a time) and give exactly the regions of the in-memory path (load, combine,
select); the sum over files equals `combine`."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches, tiny_model

from lmeval_regions.cli import main
from lmeval_regions.importance import Importance, SummedScores, combine, compute_importance
from lmeval_regions.regions import Region, monolingual, select_files, select_from_importance

LANGS = ("ar", "es", "zh")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def files(request, tmp_path_factory):
    """Per-language importance files of a tiny Llama, stored in fp32 or bf16."""
    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("bounded")
    paths = []
    for seed, lang in enumerate(LANGS):
        imp = compute_importance(model, random_batches(2, seed=seed), languages=[lang],
                                 progress=False)
        imp.scores = {n: t.to(request.param) for n, t in imp.scores.items()}
        paths.append(out / f"imp.{lang}.safetensors")
        imp.save(paths[-1])
    return paths


def _same(a: Region, b: Region) -> None:
    assert a.counts() == b.counts()
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in b.indices)
    assert a.shapes == b.shapes and a.model == b.model


def test_summed_scores_equal_combine(files):
    ref = combine([Importance.load(p) for p in files])
    lazy = SummedScores(files)
    assert list(lazy) == list(ref.scores) and lazy.shapes == ref.shapes
    for n, t in ref.scores.items():
        assert lazy.dtypes[n] == t.dtype == torch.float32
        assert torch.equal(lazy[n], t)
    meta = {k: v for k, v in ref.meta().items()}
    assert {k: lazy.meta[k] for k in meta} == meta
    one = SummedScores(files[:1])  # one file: read as stored, its own metadata
    loaded = Importance.load(files[0])
    assert all(torch.equal(one[n], t) for n, t in loaded.scores.items())
    assert one.meta["languages"] == [LANGS[0]]


def test_select_files_equal_in_memory_selection(files):
    total = combine([Importance.load(p) for p in files])
    single = Importance.load(files[0])
    for scope in ("matrix", "row", "global"):
        for method in ("top", "bottom", "middle", "random"):
            _same(select_files(files, method, 0.05, scope, seed=3),
                  select_from_importance(total, method, 0.05, scope, seed=3))
            _same(select_files(files[:1], method, 0.05, scope, seed=3),
                  select_from_importance(single, method, 0.05, scope, seed=3))
    r = select_files(files, "top", 0.05)
    assert r.spec["source"]["files"] == [str(p) for p in files]
    assert r.spec["source"]["languages"] == list(LANGS)


def refuse_whole_loads(monkeypatch) -> None:
    """From here on, any read of a whole importance artefact fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a whole importance artefact was loaded into memory")

    monkeypatch.setattr(Importance, "load", classmethod(refuse))
    monkeypatch.setattr("lmeval_regions.importance.artefact.load_artefact", refuse)


def test_extract_cli_streams_and_keeps_the_regions(files, tmp_path, monkeypatch):
    refs = {}
    total = combine([Importance.load(p) for p in files])  # the in-memory reference
    refuse_whole_loads(monkeypatch)
    for method, scope in (("top", "matrix"), ("bottom", "global"), ("middle", "row")):
        out = tmp_path / f"{method}.{scope}.safetensors"
        assert main(["extract", "--importance", ",".join(map(str, files)), "--method", method,
                     "--ratio", "0.03", "--scope", scope, "--out", str(out), "--quiet"]) == 0
        refs[method] = select_from_importance(total, method, 0.03, scope)
        got = Region.load(out)
        _same(got, refs[method])
        assert got.spec["importance_files"] == [str(p) for p in files]


def test_monolingual_cli_streams_and_keeps_the_regions(files, tmp_path, monkeypatch):
    imps = dict(zip(LANGS, (Importance.load(p) for p in files)))  # the in-memory reference
    refuse_whole_loads(monkeypatch)
    spec = ",".join(f"{l}={p}" for l, p in zip(LANGS, files))
    assert main(["monolingual", "--importance", spec, "--ratio", "0.05",
                 "--out-dir", str(tmp_path / "mono"), "--quiet"]) == 0
    ref = monolingual({l: select_from_importance(i, "top", 0.05) for l, i in imps.items()},
                      {l: select_from_importance(i, "bottom", 0.05) for l, i in imps.items()})
    for l in LANGS:
        for band in ("top", "bottom"):
            _same(Region.load(tmp_path / "mono" / f"{l}.{band}.safetensors"), ref[l][band])
