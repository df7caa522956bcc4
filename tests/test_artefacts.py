"""Artefact files: metadata, corrupt/truncated input, other models, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.artefacts import format as artefacts
from lmeval_regions.artefacts import (
    load_artefact,
    model_fingerprint,
    read_metadata,
    save_artefact,
    write_text_atomic,
)
from lmeval_regions.errors import ArtefactError
from lmeval_regions.importance import Importance
from lmeval_regions.regions import Region, from_specs


def make_region(tmp_path):
    m = tiny_model("llama")
    r = from_specs(m, "model.layers.0.mlp.down_proj.weight[1, :]; "
                      "model.layers.1.self_attn.q_proj.weight[:, 2]")
    path = tmp_path / "r.safetensors"
    r.save(path)
    return m, r, path


def test_metadata_fields(tmp_path):
    m, r, path = make_region(tmp_path)
    doc = read_metadata(path, "region")
    assert doc["kind"] == "region" and doc["library_version"]
    assert doc["model"]["params"]["model.layers.0.mlp.down_proj.weight"] == [32, 64]
    assert doc["model"]["sha256"] == model_fingerprint(m)["sha256"]
    assert doc["numel"] == 64 + 32 and doc["spec"]["entries"]
    tensors, _ = load_artefact(path)
    assert {t.dtype for t in tensors.values()} == {torch.int32}  # flat indices, not masks
    assert sum(t.numel() for t in tensors.values()) == 96


def test_truncated_file(tmp_path):
    _, _, path = make_region(tmp_path)
    data = path.read_bytes()
    for cut in (4, 40, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ArtefactError, match="truncated or corrupt"):
            Region.load(bad)


def test_corrupt_bytes_and_metadata(tmp_path):
    _, _, path = make_region(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ArtefactError, match="truncated or corrupt"):
        Region.load(junk)
    # valid safetensors without our metadata
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtefactError, match="not an lmeval-regions artefact"):
        Region.load(plain)
    save_file({"x": torch.zeros(2)}, str(plain), metadata={"lmeval_regions": "{not json"})
    with pytest.raises(ArtefactError, match="corrupt metadata"):
        Region.load(plain)
    with pytest.raises(ArtefactError, match="does not exist"):
        Region.load(tmp_path / "missing.safetensors")


def test_wrong_kind_and_out_of_range_indices(tmp_path):
    _, _, path = make_region(tmp_path)
    with pytest.raises(ArtefactError, match="holds a 'region' artefact, expected 'importance'"):
        Importance.load(path)
    bad = tmp_path / "bad.safetensors"
    save_artefact(bad, {"w": torch.tensor([0, 7], dtype=torch.int32)}, "region",
                  {"shapes": {"w": [2, 3]}, "model": {}})
    with pytest.raises(ArtefactError, match="indices of 'w' fall outside its shape"):
        Region.load(bad)


def test_region_from_another_model_names_first_mismatch(tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    _, _, path = make_region(tmp_path)
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 48, 64
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ArtefactError, match=r"another model: parameter "
                       r"'model.layers.0.mlp.down_proj.weight' has shape \[32, 64\] in the file "
                       r"but \[48, 64\]"):
        Region.load(path, other)


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    _, r, path = make_region(tmp_path)
    before = path.read_bytes()

    def half_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(artefacts, "save_file", half_then_crash)
    with pytest.raises(OSError, match="simulated"):  # an artefact written in one go
        save_artefact(path, r.indices, "region", {"shapes": r.shapes})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # no temp left
    monkeypatch.undo()

    class CrashOnSecond(dict):  # a region written tensor by tensor fails after the first
        def __getitem__(self, name):
            if name != next(iter(self)):
                raise OSError("disk full (simulated)")
            return super().__getitem__(name)

    r.indices = CrashOnSecond(r.indices)
    with pytest.raises(OSError, match="simulated"):
        r.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]
    Region.load(path)  # still loads


def test_write_text_atomic_keeps_previous_on_error(tmp_path, monkeypatch):
    p = tmp_path / "report.json"
    write_text_atomic(p, json.dumps({"a": 1}))
    from pathlib import Path

    real = Path.write_text

    def boom(self, *a, **k):
        real(self, "partial", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(p, "new")
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["report.json"]


def test_fingerprint_independent_of_module_and_mapping():
    m = tiny_model("bloom")
    fp = model_fingerprint(m)
    assert fp == model_fingerprint({n: p.shape for n, p in m.named_parameters()})
    assert fp != model_fingerprint(tiny_model("llama"))


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import stat

    p = tmp_path / "x.json"
    write_text_atomic(p, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
