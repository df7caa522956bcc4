"""`lmeval-regions` core subcommands, run through cli.main on a tiny saved Llama."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LANGS, TEXTS

from lmeval_regions.cli import main
from lmeval_regions.importance import Importance, combine
from lmeval_regions.regions import Region, monolingual, select_from_importance


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    p = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    p.write_text("".join(json.dumps({"id": i, "lang": l, "text": t}) + "\n"
                         for l in LANGS for i, t in enumerate(TEXTS[l])), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def imp_files(tiny_lm_dir, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "imp.safetensors"
    rc = main(["importance", "--model", str(tiny_lm_dir), "--langs", ",".join(LANGS),
               "--units", "3", "--texts", str(texts), "--batch-size", "2", "--out", str(out),
               "--combine", "--quiet"])
    assert rc == 0
    return out


def test_importance_per_language_and_combined(imp_files, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    parts = [Importance.load(imp_files.with_name(f"imp.{l}.safetensors"), model) for l in LANGS]
    total = Importance.load(imp_files, model)
    assert [p.languages for p in parts] == [[l] for l in LANGS]
    assert all(p.n_sequences == 3 and p.n_tokens > 0 for p in parts)
    assert total.languages == LANGS and total.n_sequences == 9
    assert total.sources[0]["units"] == [0, 3] and total.sources[0]["sha256"]
    ref = combine(parts)
    for n in total.scores:
        torch.testing.assert_close(total.scores[n], ref.scores[n])
    assert "model.layers.0.mlp.down_proj.weight" in total.scores
    assert not any("embed" in n or "lm_head" in n for n in total.scores)


def test_combine_command(imp_files, tmp_path):
    files = [str(imp_files.with_name(f"imp.{l}.safetensors")) for l in LANGS]
    assert main(["combine", *files, "--out", str(tmp_path / "c.safetensors")]) == 0
    c, ref = Importance.load(tmp_path / "c.safetensors"), Importance.load(imp_files)
    assert all(torch.equal(c.scores[n], ref.scores[n]) for n in ref.scores)


def test_extract_matches_library(imp_files, tmp_path, capsys):
    out = tmp_path / "top.safetensors"
    assert main(["extract", "--importance", str(imp_files), "--method", "top", "--ratio", "0.05",
                 "--scope", "matrix", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    r = Region.load(out)
    ref = select_from_importance(Importance.load(imp_files), "top", 0.05, "matrix")
    assert r.counts() == ref.counts()
    assert all(torch.equal(r.indices[n], ref.indices[n]) for n in ref.indices)
    assert r.spec["method"] == "top" and r.spec["ratio"] == 0.05


def test_setop_and_stats(imp_files, tmp_path, capsys):
    paths = {}
    for m in ("top", "random"):
        paths[m] = tmp_path / f"{m}.safetensors"
        main(["extract", "--importance", str(imp_files), "--method", m, "--ratio", "0.1",
              "--out", str(paths[m])])
    a, b = Region.load(paths["top"]), Region.load(paths["random"])
    for op in ("union", "intersection", "difference"):
        out = tmp_path / f"{op}.safetensors"
        assert main(["setop", op, str(paths["top"]), str(paths["random"]), "--out", str(out)]) == 0
        assert Region.load(out).counts() == getattr(a, op)(b).counts()
    capsys.readouterr()
    js = tmp_path / "stats.json"
    assert main(["stats", str(paths["top"]), "--against", str(paths["random"]),
                 "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "mlp.down_proj" in text and "Jaccard" in text
    st = json.loads(js.read_text())
    inter = (a & b).numel()
    assert st["entries"] == a.numel()
    assert st["overlap"]["jaccard"] == pytest.approx(inter / (a.numel() + b.numel() - inter))
    assert sum(st["per_layer"].values()) == a.numel()
    assert set(st["per_layer"]) == {"0", "1"}


def test_monolingual_command(imp_files, tmp_path):
    spec = ",".join(f"{l}={imp_files.with_name(f'imp.{l}.safetensors')}" for l in LANGS)
    assert main(["monolingual", "--importance", spec, "--ratio", "0.05",
                 "--out-dir", str(tmp_path / "mono")]) == 0
    imps = {l: Importance.load(imp_files.with_name(f"imp.{l}.safetensors")) for l in LANGS}
    ref = monolingual({l: select_from_importance(i, "top", 0.05) for l, i in imps.items()},
                      {l: select_from_importance(i, "bottom", 0.05) for l, i in imps.items()})
    for l in LANGS:
        for band in ("top", "bottom"):
            got = Region.load(tmp_path / "mono" / f"{l}.{band}.safetensors")
            assert got.counts() == ref[l][band].counts()


def test_apply_evaluates_and_saves(tiny_lm_dir, texts, imp_files, tmp_path, capsys):
    top = tmp_path / "top.safetensors"
    main(["extract", "--importance", str(imp_files), "--ratio", "0.05", "--out", str(top)])
    js = tmp_path / "ppl.json"
    rc = main(["apply", "--model", str(tiny_lm_dir), "--texts", str(texts), "--eval-start", "3",
               "--eval-langs", "en,fr", "--edit",
               f"{top}@zero;model.layers.0.input_layernorm.weight[3]@constant:1",
               "--save", str(tmp_path / "edited"), "--json", str(js), "--quiet"])
    assert rc == 0
    res = json.loads(js.read_text())
    assert set(res["base"]) == {"en", "fr"}
    assert all(res["edited"][l] != res["base"][l] for l in res["base"])
    from transformers import AutoModelForCausalLM
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    w = edited.get_parameter("model.layers.0.input_layernorm.weight")
    assert float(w[3].detach()) == 1.0
    r = Region.load(top, edited)
    n = next(iter(r.indices))
    assert bool((edited.get_parameter(n).detach().view(-1)[r.indices[n].long()] == 0).all())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    capsys.readouterr()
    assert main(["apply", "--model", str(tiny_lm_dir), "--edit", f"{top}@zero",
                 "--save", str(tmp_path / "edited")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["extract", "--importance", "IMP", "--ratio", "1.5", "--out", "x.safetensors"],
     r"ratio 1.5 is outside \(0, 1\]"),
    (["extract", "--importance", "IMP", "--ratio", "0", "--out", "x.safetensors"],
     r"ratio 0.0 is outside"),
    (["extract", "--importance", "missing.safetensors", "--out", "x.safetensors"],
     r"does not exist"),
    (["setop", "union", "REG", "--out", "x.safetensors"], r"at least two regions"),
    (["monolingual", "--importance", "en=IMP", "--out-dir", "d"], r"at least two languages"),
    (["monolingual", "--importance", "IMP,fr=IMP", "--out-dir", "d"], r"is not LANG=FILE"),
    (["stats", "IMP"], r"holds a 'importance' artefact, expected 'region'"),
    (["apply", "--edit", "x.safetensors", "--no-evaluate"], r"nothing to do"),
])
def test_cli_errors_exit_2(argv, match, imp_files, tmp_path, capsys):
    argv = [str(imp_files) if a == "IMP" else a for a in argv]
    argv = [a.replace("IMP", str(imp_files)) if "=IMP" in a else a for a in argv]
    if "REG" in argv:
        reg = tmp_path / "r.safetensors"
        main(["extract", "--importance", str(imp_files), "--out", str(reg)])
        argv = [str(reg) if a == "REG" else a for a in argv]
    argv = [str(tmp_path / a) if a.endswith(".safetensors") and "/" not in a else a for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    import re
    assert re.search(match, err), err


def test_importance_errors(tiny_lm_dir, texts, tmp_path, capsys):
    base = ["importance", "--model", str(tiny_lm_dir), "--texts", str(texts), "--quiet",
            "--out", str(tmp_path / "i.safetensors")]
    assert main(base + ["--langs", "en,xx"]) == 2
    assert "language 'xx' is not in" in capsys.readouterr().err
    assert main(base + ["--langs", "en", "--units", "9"]) == 2
    assert "has only 4 units" in capsys.readouterr().err
    assert main(base + ["--langs", "en", "--units", "2", "--include",
                        "model.layers.0.mlp.down_prj.weight"]) == 2
    assert "Did you mean: model.layers.0.mlp.down_proj.weight" in capsys.readouterr().err


def test_help_texts(capsys):
    for cmd in ["importance", "extract", "setop", "stats", "monolingual", "apply", "model-path",
                "combine"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out, cmd
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ["importance", "extract", "setop", "stats", "monolingual"])


def test_model_path_prints_a_loadable_folder(smollm_tokenizer, capsys):
    from pathlib import Path

    assert main(["model-path", "smollm2-135m"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert main(["model-path", "gemma-3-27m"]) == 2
    assert "Did you mean: gemma-3-270m" in capsys.readouterr().err
