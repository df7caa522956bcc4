"""The CLI is generated from the configuration dataclasses: every subcommand's flags and
defaults are the dataclasses' fields, every model-loading command takes the same model flags,
every corpus-reading command the same corpus flags, and ``--config FILE`` reproduces a run."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import yaml

from lmeval_regions.cli.main import build_parser, commands, main
from lmeval_regions.cli.options import build_sections, default_of, fields_of, flag
from lmeval_regions.corpora import CorpusConfig, HeldOutConfig
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import ModelConfig

# Every subcommand that loads a model, and every one that reads a corpus.
LOADS_A_MODEL = {"importance", "apply", "table", "dims-report", "dims", "outliers", "plot-region",
                 "activations", "neurons", "neuron-sweep", "demo", "import-neurons",
                 "robustness", "further-pretrain"}
READS_A_CORPUS = {"importance", "apply", "dims-report", "dims", "outliers", "activations",
                  "neurons", "neuron-sweep", "demo", "robustness", "further-pretrain"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_and_default_is_a_dataclass_field():
    subs = _subparsers(build_parser())
    cmds = {c.name: c for c in commands()}
    assert set(subs) == set(cmds)
    for name, cmd in cmds.items():
        actions = {a.dest: a for a in subs[name]._actions}
        fields_seen = set()
        for section, cls in cmd.sections:
            for f in fields_of(cls):
                dest = f"{section}.{f.name}"
                assert dest in actions, f"{name}: {cls.__name__}.{f.name} has no flag"
                act = actions[dest]
                if not f.metadata.get("positional"):
                    assert act.option_strings[0] == flag(f.name, f), (name, f.name)
                assert act.default is argparse.SUPPRESS  # defaults live in the dataclass only
                fields_seen.add(dest)
        ours = {d for d in actions if "." in d}
        assert ours == fields_seen, f"{name}: flags without a field: {ours - fields_seen}"
        # built from no flags at all, each section holds its dataclass defaults
        required = [f for _, c in cmd.sections for f in fields_of(c)
                    if default_of(f) is dataclasses.MISSING]
        if not required:
            try:
                built = build_sections(cmd.sections, argparse.Namespace())
            except RegionsError:
                continue  # a section validates cross-field needs (e.g. two regions)
            for section, cls in cmd.sections:
                defaults = cls()
                for f in fields_of(cls):
                    assert getattr(built[section], f.name) == getattr(defaults, f.name), \
                        (name, f.name)


def test_model_and_corpus_flags_are_the_same_everywhere():
    subs = _subparsers(build_parser())
    cmds = {c.name: c for c in commands()}
    for name, cmd in cmds.items():
        classes = [cls for _, cls in cmd.sections]
        assert (ModelConfig in classes) == (name in LOADS_A_MODEL), name
        assert (CorpusConfig in classes) == (name in READS_A_CORPUS), name
    model_flags = {f.name: flag(f.name, f) for f in fields_of(ModelConfig)}
    corpus_flags = {f.name: flag(f.name, f) for f in fields_of(CorpusConfig)}
    assert {"--device", "--dtype", "--model", "--device-map", "--revision"} <= set(
        model_flags.values())
    for name in LOADS_A_MODEL:
        opts = {o for a in subs[name]._actions for o in a.option_strings}
        assert set(model_flags.values()) <= opts, name
        ns = subs[name].parse_args(["--device", "cpu", "--dtype", "bfloat16"]
                                   + (["x"] if name in ("dims", "plot-region") else []))
        assert vars(ns)["model.device"] == "cpu" and vars(ns)["model.dtype"] == "bfloat16"
    for name in READS_A_CORPUS:
        opts = {o for a in subs[name]._actions for o in a.option_strings}
        assert set(corpus_flags.values()) <= opts, name
    # one held-out configuration wherever perplexity is measured directly
    for name in ("apply", "dims-report", "dims", "neurons", "robustness", "further-pretrain"):
        assert HeldOutConfig in [cls for _, cls in cmds[name].sections], name


def test_bad_values_name_the_flag_and_the_expected_form(capsys):
    assert main(["extract", "--importance", "x.safetensors", "--out", "y.safetensors",
                 "--ratio", "abc"]) == 2
    assert "--ratio" in capsys.readouterr().err
    assert main(["importance", "--out", "i.safetensors", "--dtype", "float8"]) != 0
    assert main(["importance", "--out", "i.safetensors", "--device", "gpu0"]) == 2
    assert "device 'gpu0' is not a torch device" in capsys.readouterr().err
    assert main(["importance", "--out", "i.safetensors", "--max-length", "0"]) == 2
    assert "--max-length 0 must be >= 2" in capsys.readouterr().err


@pytest.fixture
def texts(shared_data):
    return str(shared_data / "udhr_parallel_31.jsonl")


def test_config_file_reproduces_a_run(tiny_lm_dir, texts, tmp_path, capsys):
    """importance with flags writes its config beside the artefact; the same command from
    that config (only --out changed) gives a bit-identical artefact; flags override it."""
    from lmeval_regions.importance import Importance

    out = tmp_path / "a" / "imp.safetensors"
    assert main(["importance", "--model", str(tiny_lm_dir), "--device", "cpu", "--texts", texts,
                 "--langs", "en,fr", "--units", "2", "--max-length", "24", "--batch-size", "2",
                 "--criteria", "abs_sum", "--combine", "--out", str(out), "--quiet"]) == 0
    cfg_path = tmp_path / "a" / "imp.config.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    assert doc["command"] == "importance"
    assert doc["corpus"]["langs"] == ["en", "fr"] and doc["corpus"]["units"] == 2
    assert doc["importance"]["criteria"] == ["abs_sum"] and doc["args"]["combine"] is True
    assert doc["model"]["device"] == "cpu"

    again = tmp_path / "b" / "imp.safetensors"
    assert main(["importance", "--config", str(cfg_path), "--out", str(again), "--quiet"]) == 0
    a, b = Importance.load(out), Importance.load(again)
    assert a.scores.keys() == b.scores.keys()
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)
    assert a.n_tokens == b.n_tokens and a.criterion == b.criterion == "abs_sum"
    for lang in ("en", "fr"):
        x = Importance.load(tmp_path / "a" / f"imp.{lang}.safetensors")
        y = Importance.load(tmp_path / "b" / f"imp.{lang}.safetensors")
        assert all(torch.equal(x.scores[n], y.scores[n]) for n in x.scores)
    # the re-run's own config equals the first one but for --out
    doc_b = yaml.safe_load((tmp_path / "b" / "imp.config.yaml").read_text())
    doc_b["args"]["out"] = doc["args"]["out"]
    assert doc_b == doc

    # a flag overrides the file; the file must belong to this command
    capsys.readouterr()
    assert main(["extract", "--config", str(cfg_path)]) == 2
    assert "is a config of 'importance', not of 'extract'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"command": "importance", "corpus": {"unitz": 3}}))
    assert main(["importance", "--config", str(bad), "--out", str(again)]) == 2
    assert "unknown field(s) ['unitz']" in capsys.readouterr().err


def test_report_folders_hold_their_config(tiny_lm_dir, texts, tmp_path):
    """A command writing a folder keeps its config inside it (monolingual here)."""
    imp = tmp_path / "imp.safetensors"
    assert main(["importance", "--model", str(tiny_lm_dir), "--device", "cpu", "--texts", texts,
                 "--langs", "en,fr", "--units", "1", "--max-length", "16", "--out", str(imp),
                 "--quiet"]) == 0
    out = tmp_path / "mono"
    assert main(["monolingual", "--importance",
                 f"en={tmp_path / 'imp.en.safetensors'},fr={tmp_path / 'imp.fr.safetensors'}",
                 "--ratio", "0.05", "--out-dir", str(out)]) == 0
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["command"] == "monolingual" and doc["args"]["ratio"] == 0.05
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "en.bottom.safetensors", "en.top.safetensors", "fr.bottom.safetensors",
        "fr.top.safetensors"]


def test_importance_criteria_and_snapshots_in_one_run(tiny_lm_dir, texts, tmp_path):
    """`importance --criteria A,B --snapshots N --combine`: one file per language x criterion x
    snapshot and their sums, each equal to a separate single-criterion run over the same
    sequences (the first N of each language for a snapshot)."""
    from lmeval_regions.importance import Importance

    common = ["--model", str(tiny_lm_dir), "--device", "cpu", "--texts", texts, "--langs",
              "en,fr", "--units", "4", "--max-length", "24", "--batch-size", "2", "--quiet"]
    out = tmp_path / "imp.safetensors"
    assert main(["importance", *common, "--criteria", "sum_abs,fisher", "--snapshots", "2",
                 "--combine", "--out", str(out)]) == 0
    names = sorted(p.name for p in tmp_path.glob("imp*.safetensors"))
    assert names == sorted(f"imp{l}{c}{n}.safetensors" for l in ("", ".en", ".fr")
                           for c in (".sum_abs", ".fisher") for n in ("", ".n2"))
    for crit in ("sum_abs", "fisher"):
        one = tmp_path / "one" / "imp.safetensors"
        assert main(["importance", *common, "--criteria", crit, "--combine",
                     "--out", str(one)]) == 0
        ref, got = Importance.load(one), Importance.load(tmp_path / f"imp.{crit}.safetensors")
        assert got.criterion == crit and got.snapshot is None
        assert all(torch.equal(ref.scores[n], got.scores[n]) for n in ref.scores)
        two = tmp_path / "two" / "imp.safetensors"
        assert main(["importance", *common, "--units", "2", "--criteria", crit, "--combine",
                     "--out", str(two)]) == 0
        snap = Importance.load(tmp_path / f"imp.{crit}.n2.safetensors")
        ref2 = Importance.load(two)
        assert snap.snapshot == 2 and snap.n_sequences == ref2.n_sequences == 4
        assert all(torch.equal(ref2.scores[n], snap.scores[n]) for n in ref2.scores)
        for d in ("one", "two"):
            for p in (tmp_path / d).iterdir():
                p.unlink()


def test_importance_resumes_languages_made_from_the_same_inputs(tiny_lm_dir, texts, tmp_path,
                                                               capsys):
    """A re-run reuses every language file made from the same inputs (nothing recomputed, the
    files untouched); a changed input is refused unless --overwrite."""
    out = tmp_path / "imp.safetensors"
    argv = ["importance", "--model", str(tiny_lm_dir), "--device", "cpu", "--texts", texts,
            "--langs", "en,fr", "--units", "2", "--max-length", "16", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    files = {p: p.read_bytes() for p in tmp_path.glob("imp.*.safetensors")}
    assert len(files) == 2
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("reused") == 2 and "wrote" not in log.replace("config:", "")
    assert all(p.read_bytes() == b for p, b in files.items())
    assert main(argv[:-3] + ["--max-length", "20", "--out", str(out), "--quiet"]) == 2
    assert "made from other inputs" in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in files.items())
