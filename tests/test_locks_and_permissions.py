"""Issue 14: concurrent writers of one artefact or cache entry (one waits or fails clearly, the
result is valid), and files and folders readable as the umask allows (atomic writes, the
converted-model cache, saved models, figures)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO, random_batches, tiny_model

from lmeval_regions.cli import main
from lmeval_regions.importance import Importance, compute_importance


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def test_two_concurrent_writers_of_one_output(tmp_path):
    """Two `combine` processes started together on one output: exactly one succeeds, the
    other fails with a message naming the output (it is being written, or now exists), and
    the file is the valid sum."""
    parts = []
    for i, lang in enumerate(["ar", "es"]):
        imp = compute_importance(tiny_model("llama"), random_batches(seed=i), languages=[lang],
                                 progress=False)
        imp.save(tmp_path / f"imp.{lang}.safetensors")
        parts.append(imp)
    out = tmp_path / "sum.safetensors"
    cmd = [sys.executable, "-m", "lmeval_regions.cli", "combine",
           str(tmp_path / "imp.ar.safetensors"), str(tmp_path / "imp.es.safetensors"),
           "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and str(out) in err
    assert ("being written by another lmeval-regions process" in err
            or "already exists" in err), err
    got = Importance.load(out)
    for n, t in got.scores.items():
        assert (t == parts[0].scores[n] + parts[1].scores[n]).all()


_CONVERT = r'''
import json, os, sys, time
from pathlib import Path
os.umask(0o022)
from lmeval_regions.models import embedded

def convert(spec, out):
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(3)  # long enough for the other process to arrive
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    out.mkdir(mode=0o700)  # private folders, as a TemporaryDirectory makes them
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    (out / "extra").mkdir(mode=0o700)

embedded.EMBEDDED["fake-tiny"] = embedded.EmbeddedModel(
    "fake-tiny", "pip install nothing", lambda work: work, model="a fake tiny Llama",
    quantisation="none", convert=convert)
print(embedded.resolve_pretrained("fake-tiny", progress=False))
'''


def test_model_cache_is_converted_once_under_concurrency(tmp_path):
    """Two processes resolving one embedded model at once: the conversion runs once (the
    other waits on the lock and reuses the folder), both get the same valid folder, no
    half-made folder is left, and it is readable as the umask (022) allows, not 0700."""
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(LMEVAL_REGIONS_CACHE=str(cache)))
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines()[-1])
    target = cache / "models" / "fake-tiny"
    assert outs == [str(target), str(target)]
    assert len(log.read_text().splitlines()) == 1  # converted once
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["fake-tiny"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(target).config.hidden_size == 16
    for folder in (target, target / "extra"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, oct(folder.stat().st_mode)


def test_a_stale_cache_folder_is_replaced(tmp_path, monkeypatch):
    """A folder left without config.json (a crash before this version's atomic rename) is
    converted again rather than returned or crashing on rename."""
    from lmeval_regions.models import embedded

    monkeypatch.setenv("LMEVAL_REGIONS_CACHE", str(tmp_path))
    calls = []

    def convert(spec, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(embedded.EMBEDDED, "fake-stale", embedded.EmbeddedModel(
        "fake-stale", "", lambda w: w, convert=convert))
    stale = tmp_path / "models" / "fake-stale"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    assert embedded.resolve_pretrained("fake-stale", progress=False) == str(stale)
    assert len(calls) == 1 and sorted(p.name for p in stale.iterdir()) == ["config.json"]
    assert embedded.resolve_pretrained("fake-stale", progress=False) == str(stale)
    assert len(calls) == 1  # cached now


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_respect_the_umask(tmp_path, umask022):
    from lmeval_regions.artefacts import save_artefact, write_text_atomic

    write_text_atomic(tmp_path / "new" / "a.json", "{}")
    import torch

    save_artefact(tmp_path / "new2" / "b.safetensors", {"x": torch.zeros(2)}, "region", {})
    for p, mode in ((tmp_path / "new", 0o755), (tmp_path / "new" / "a.json", 0o644),
                    (tmp_path / "new2", 0o755), (tmp_path / "new2" / "b.safetensors", 0o644)):
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))


def test_saved_edited_model_is_group_readable(tiny_lm_dir, tmp_path, capsys, umask022):
    out = tmp_path / "edited"
    rc = main(["apply", "--model", str(tiny_lm_dir), "--no-evaluate", "--edit",
               "model.layers.0.input_layernorm.weight[3]@constant:1", "--save", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir())


def test_held_lock_waits_for_the_cache(tmp_path, monkeypatch):
    """`locked(wait=...)` waits for a lock held by another process and then enters; with
    wait 0 it fails at once naming the path."""
    from lmeval_regions.artefacts import locked
    from lmeval_regions.errors import RegionsError

    monkeypatch.setenv("LMEVAL_REGIONS_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "entry"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom lmeval_regions.artefacts import locked\n"
         f"with locked([{str(target)!r}]):\n    print('held', flush=True)\n    time.sleep(4)\n"],
        stdout=subprocess.PIPE, text=True, env=_env(LMEVAL_REGIONS_CACHE=str(tmp_path / "cache")))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RegionsError, match="is being written by another"):
        with locked([target]):
            pass
    t0 = time.time()
    with locked([target], wait=120):
        waited = time.time() - t0
    holder.wait()
    assert waited > 0.5  # it waited for the holder to finish
    json.dumps(waited)
