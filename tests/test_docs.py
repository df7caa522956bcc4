"""Docs that run: every command written in README.md and docs/*.md is checked by the real
parsers, and Python snippets compile (the cheap ones run on a tiny model).

* ``lmeval-regions ...``: ``build_parser().parse_args`` + ``build_sections`` (every dataclass's
  validation), without executing; entry specs (``apply --edit``) are resolved on the embedded
  model's structure (meta device, no weights), so an index beyond the hidden size fails;
* ``lm_eval`` / ``lm-eval-regions``: lm-eval's own parser; the model must be registered; an
  ``hf-regions`` model_args must pass its key check and its specs resolve on the model; every
  task must be in the index that command sees (plain ``lm_eval`` sees our tasks only through
  ``--include_path``);
* ``python FILE.py`` / ``python -m MODULE``: the script or module exists and defines every flag
  used; ``bash FILE``: exists and parses (``bash -n``).

``tests/test_first_hour.py`` runs the README's commands for real, in order.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import doc_commands as D  # noqa: E402

EMBEDDED_SIZES = {"gemma-3-270m": 640, "smollm2-135m": 576}


class DocError(AssertionError):
    pass


@lru_cache(maxsize=None)
def _meta(model: str):
    from lmeval_regions.models import meta_model

    return meta_model(model)


@lru_cache(maxsize=None)
def _task_index() -> tuple[frozenset, frozenset]:
    """(lm-eval's own task names, ours) as a TaskManager with our include path sees them."""
    from lm_eval.tasks import TaskManager

    from lmeval_regions.eval.tasks import tasks_path

    ours = tasks_path().resolve()
    idx = TaskManager(include_path=str(ours)).task_index
    mine = {n for n, v in idx.items()
            if v.yaml_path and Path(v.yaml_path).resolve().is_relative_to(ours)}
    return frozenset(set(idx) - mine), frozenset(mine)


@lru_cache(maxsize=None)
def _user_data() -> Path:
    """Stand-in for ``/data/``, where the docs put the reader's own corpus files: each file a
    command names there is created here (a few lines of text), so the corpus checks run."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="doc_user_data_"))


def _user_files(text: str) -> str:
    """``text`` with every ``/data/NAME`` path moved to :func:`_user_data`, the file created."""
    def make(m: re.Match) -> str:
        path = _user_data() / m.group(1)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("All human beings are born free and equal in dignity and rights.\n"
                            * 4, encoding="utf-8")
        return str(path)

    return re.sub(r"(?<![\w.])/data/([\w.-]+\.(?:txt|jsonl|csv|tsv|parquet))", make, text)


def _substitute(text: str) -> str:
    """Shell substitutions the docs use, done here (the test runs no shell); the reader's own
    files under ``/data/`` stand in as small files (:func:`_user_files`)."""
    from lmeval_regions.eval.tasks import tasks_path
    from lmeval_regions.models import resolve_pretrained

    text = _user_files(text)
    text = text.replace("$(lmeval-regions tasks-path)", str(tasks_path()))
    return re.sub(r"\$\(lmeval-regions model-path ([\w.-]+)\)",
                  lambda m: resolve_pretrained(m.group(1), progress=False), text)


def _specs_resolve(model: str, targets) -> None:
    """Entry specs (not files) resolve on the model's structure (embedded models only)."""
    from lmeval_regions.interventions import resolve_target

    if model not in EMBEDDED_SIZES:
        return
    for target in targets:
        if not target.endswith(".safetensors"):
            resolve_target(_meta(model), target)


def check_lmeval_regions(argv: list[str]) -> None:
    import argparse

    from lmeval_regions.cli.main import build_parser
    from lmeval_regions.cli.options import build_sections
    from lmeval_regions.interventions import parse_edits

    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = parser.parse_args(argv[1:])
    except SystemExit as e:
        if e.code == 0 and ({"-h", "--help", "--version"} & set(argv)):
            return
        raise DocError(f"the parser refused it: {err.getvalue().strip().splitlines()[-1:]}")
    cmd = ns._command
    given = argparse.Namespace(**{k: v for k, v in vars(ns).items() if "." in k})
    sections = build_sections(cmd.sections, given)  # every dataclass's __post_init__
    if cmd.name == "apply":
        _specs_resolve(sections["model"].model,
                       [t for t, _ in parse_edits(sections["args"].edit)])


def check_lm_eval(argv: list[str]) -> None:
    import lm_eval.api.registry as registry
    from lm_eval._cli import HarnessCLI

    import lmeval_regions.eval.model  # noqa: F401 - registers hf-regions
    from lmeval_regions.eval.model import OUR_KEYS, _check_unknown_keys
    from lmeval_regions.interventions import parse_edits

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = HarnessCLI()._parser.parse_args(["run", *argv[1:]])
    except SystemExit:
        raise DocError(f"lm-eval's parser refused it: {err.getvalue().strip()[-300:]}")
    registry.get_model(args.model)  # unknown model: an error naming it
    model_args = dict(args.model_args or {})
    if args.model == "hf-regions":
        _check_unknown_keys({k: v for k, v in model_args.items() if k not in OUR_KEYS})
        if "region" in model_args:
            _specs_resolve(str(model_args.get("pretrained")),
                           [t for t, _ in parse_edits(str(model_args["region"]))])
    for key in ("pretrained",):
        if key in model_args and re.search(r"[<>]|^PATH$|\.\.\.", str(model_args[key])):
            raise DocError(f"placeholder {key}={model_args[key]}")
    theirs, ours = _task_index()
    visible = set(theirs)
    if argv[0] == "lm-eval-regions" or args.include_path:
        visible |= ours
    tasks = args.tasks if isinstance(args.tasks, list) else str(args.tasks).split(",")
    tasks = [t for group in tasks for t in str(group).split(",") if t]
    missing = [t for t in tasks if t not in visible]
    if missing:
        raise DocError(f"tasks {missing} are not in the index `{argv[0]}` sees"
                       + (" (plain lm_eval needs --include_path)" if set(missing) <= ours
                          else ""))


def _flags_of(source: str) -> set[str]:
    """Every option string given to add_argument in a script."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args
                      if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def check_python(argv: list[str]) -> None:
    rest = argv[1:]
    if rest[:1] == ["-c"]:
        try:
            compile(rest[1], "<python -c>", "exec")
        except SyntaxError as e:
            raise DocError(f"python -c: {e}") from None
        return
    if rest[:1] == ["-m"]:
        module = rest[1]
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise DocError(f"module {module} does not exist")
        if not module.startswith("lmeval_regions"):
            return  # pytest and the like
        path = Path(spec.origin)
        if spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / "__main__.py"
        source = path.read_text() if path.exists() else ""
        if "__main__" not in source:
            raise DocError(f"module {module} cannot be run with python -m")
        used = rest[2:]
    else:
        script = REPO / rest[0]
        if not script.is_file():
            raise DocError(f"{rest[0]} does not exist")
        source, used = script.read_text(), rest[1:]
    defined = _flags_of(source)
    unknown = [f.split("=")[0] for f in used if f.startswith("-") and f.split("=")[0]
               not in defined]
    if unknown:
        raise DocError(f"flags {unknown} are not defined (it has {sorted(defined)})")


def check_bash(argv: list[str]) -> None:
    script = REPO / argv[1]
    if not script.is_file():
        raise DocError(f"{argv[1]} does not exist")
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if res.returncode:
        raise DocError(f"bash -n: {res.stderr.strip()}")


def check_command(c: D.DocCommand) -> None:
    """Raise DocError (naming the file, line and command) unless the command would run."""
    import shlex

    from lmeval_regions.errors import RegionsError

    argv = shlex.split(_substitute(" ".join(shlex.quote(a) for a in c.argv)))
    try:
        if c.program == "lmeval-regions":
            if c.mention:
                from lmeval_regions.cli.main import commands

                if argv[1] not in {x.name for x in commands()}:
                    raise DocError(f"no subcommand {argv[1]}")
                return
            check_lmeval_regions(argv)
        elif c.program in ("lm_eval", "lm-eval-regions"):
            check_lm_eval(argv)
        elif c.program in ("python", "python3"):
            check_python(argv)
        elif c.program == "bash":
            check_bash(argv)
    except DocError as e:
        raise DocError(f"{c.where()}\n  -> {e}") from None
    except (RegionsError, ValueError, KeyError) as e:
        raise DocError(f"{c.where()}\n  -> {type(e).__name__}: {e}") from None


def all_commands() -> list[D.DocCommand]:
    return [c for f in D.doc_files(REPO) for c in D.commands(f, REPO)]


def test_docs_have_commands():
    found = all_commands()
    assert len(found) > 40
    assert {c.file for c in found} >= {"README.md", "docs/core.md", "docs/lm_eval.md",
                                        "docs/tasks.md", "docs/neurons.md"}


@pytest.mark.parametrize("c", all_commands(), ids=lambda c: f"{c.file}:{c.line}")
def test_documented_command(c):
    check_command(c)


BROKEN = {
    "extract --ratio 2": "lmeval-regions extract --importance imp.safetensors --ratio 2 "
                         "--out x.safetensors",
    "index beyond the hidden size": "lmeval-regions apply --model smollm2-135m --edit "
                                    "'model.layers.*.input_layernorm.weight[2100]@constant:1'",
    "--mode a|b": "python -m lmeval_regions.studies.further_pretrain --mode full freeze",
    "plain lm_eval, our task": "lm_eval --model hf-regions --model_args pretrained=gemma-3-270m "
                               "--tasks udhr_ppl",
    "placeholder": "lm_eval --model hf --model_args pretrained=PATH "
                   "--include_path \"$(lmeval-regions tasks-path)\" --tasks udhr_ppl",
    "list with a space": "lmeval-regions neuron-sweep --models gemma-3-270m smollm2-135m --out r",
    "missing script": "OMP_NUM_THREADS=1 nice -n 10 python scripts/dimensions_report.py --out r",
    "unknown flag": "python benchmarks/bench_eval.py --nope 3",
    "misspelt key": "lm-eval-regions --model hf-regions "
                    "--model_args pretrained=gemma-3-270m,regoin=x.safetensors --tasks udhr_ppl",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_checker_fails_on_broken_commands(name, tmp_path):
    """The check can fail: each of these (the kinds of mistake the docs had) is caught."""
    md = tmp_path / "README.md"
    md.write_text(f"# x\n\n```bash\n{BROKEN[name]}\n```\n")
    cmds = D.commands(md, tmp_path)
    assert len(cmds) == 1
    with pytest.raises(DocError):
        check_command(cmds[0])


def test_extractor_reads_continuations_comments_chains_and_inline(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Run `lmeval-regions tasks-path` first.\n\n```bash\n"
                  "A=1 nice -n 5 lmeval-regions stats a.safetensors \\\n"
                  "    --json s.json   # a comment\n"
                  "bash scripts/install.sh && python3 -m pytest\n```\n\n"
                  "    lm_eval --tasks x\n")
    cmds = D.commands(md, tmp_path)
    assert [c.argv for c in cmds] == [
        ["lmeval-regions", "tasks-path"],
        ["lmeval-regions", "stats", "a.safetensors", "--json", "s.json"],
        ["bash", "scripts/install.sh"], ["python3", "-m", "pytest"],
        ["lm_eval", "--tasks", "x"]]
    assert cmds[1].env == {"A": "1"} and cmds[0].inline


# ---- Python snippets -------------------------------------------------------------------------

def all_snippets() -> list[D.Snippet]:
    return [s for f in D.doc_files(REPO) for s in D.snippets(f, REPO)]


@pytest.mark.parametrize("s", all_snippets(), ids=lambda s: f"{s.file}:{s.line}")
def test_python_snippet_compiles(s):
    compile(s.code, f"{s.file}:{s.line}", "exec")


def _snippet(file: str, needle: str) -> D.Snippet:
    found = [s for s in all_snippets() if s.file == file and needle in s.code]
    assert len(found) == 1, (file, needle)
    return found[0]


@pytest.mark.parametrize("file,needle", [("docs/tasks.md", "simple_evaluate("),
                                          ("docs/lm_eval.md", "simple_evaluate(")])
def test_simple_evaluate_snippets_run_on_cpu(file, needle, tiny_lm_dir, tmp_path, monkeypatch):
    """The documented simple_evaluate calls run as written on a CPU machine, with the model
    replaced by a tiny one (and a region made for it), one task, two documents."""
    import torch

    from lmeval_regions.regions import from_specs

    monkeypatch.chdir(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    from_specs(model, "model.layers.0.mlp.down_proj.weight[:, 3]").save(
        tmp_path / "top1.safetensors")
    code = _snippet(file, needle).code
    for name in ("gemma-3-270m", "smollm2-135m"):
        code = code.replace(f'"{name}"', repr(str(tiny_lm_dir)))
    code = re.sub(r'(tasks=\["udhr_ppl_\w+"\])', r"\1, limit=2", code)
    assert "limit=2" in code and str(tiny_lm_dir) in code
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, file, "exec"), ns)
    res = ns["results"]["results"]
    assert any("token_perplexity,none" in v for v in res.values())


def test_pooled_perplexity_snippet_runs():
    code = _snippet("docs/tasks.md", "pooled_perplexity").code
    results = {"results": {f"udhr_ppl_{l}": {"nll_sum,none": 10.0, "token_count,none": 5,
                                             "byte_count,none": 20, "word_count,none": 4}
                           for l in ("ar", "en")},
               "group_subtasks": {"udhr_ppl_paper1": ["udhr_ppl_ar", "udhr_ppl_en"]}}
    ns = {"results": results}
    exec(compile(code, "docs/tasks.md", "exec"), ns)


# ---- what the docs and --help must say ---------------------------------------------------------

def test_every_subcommand_has_a_description_and_an_example(capsys):
    from lmeval_regions.cli.main import commands, main

    for cmd in commands():
        assert len(cmd.description.splitlines()[0]) > 20, cmd.name
        with pytest.raises(SystemExit) as e:
            main([cmd.name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert re.search(r"^examples?:", out, re.M), cmd.name
        examples = [l.strip() for l in out.splitlines() if "lmeval-regions " + cmd.name in l]
        assert examples, f"{cmd.name}: no example command in --help"


def test_help_examples_parse():
    """The example commands of every --help (generated descriptions included) parse and
    validate like the docs' commands."""
    from lmeval_regions.cli.main import commands

    checked = set()
    for cmd in commands():
        text = cmd.description.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.match(r"^\s*(?:examples?:\s*)?(lmeval-regions " + re.escape(cmd.name)
                         + r"\b[^#]*)", line)
            if m:
                c = D.DocCommand(f"--help of {cmd.name}", 0, m.group(1),
                                 D._split_words(m.group(1))[1], {})
                check_command(c)
                checked.add(cmd.name)
    assert checked == {c.name for c in commands()}


def test_readme_says_what_the_embedded_models_are():
    from lmeval_regions.models import EMBEDDED

    readme = (REPO / "README.md").read_text()
    for name, e in EMBEDDED.items():
        row = next(l for l in readme.splitlines() if l.startswith(f"| `{name}`"))
        row = row.replace("*", "")  # bold
        assert e.quantisation.split(" ")[0] in row  # Q4_K_M, Q4_1
        assert e.model.split(" ")[0] in row          # Gemma-3-270M, SmolLM2-135M-Instruct
        assert "de-quantised" in readme


def test_model_path_says_what_the_model_is(smollm_tokenizer, capsys):
    from lmeval_regions.cli.main import main

    assert main(["model-path", "smollm2-135m"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines() == [out.strip()]  # only the path on stdout, for $(...)
    assert Path(out.strip()).is_dir()
    assert "SmolLM2-135M-Instruct" in err and "Q4_1" in err and "de-quantised" in err


@pytest.mark.parametrize("model,hidden", list(EMBEDDED_SIZES.items()))
def test_hidden_sizes_said_in_the_docs_are_the_models(model, hidden):
    cfg = _meta(model).config
    assert cfg.hidden_size == hidden
    assert f"{hidden}" in (REPO / "README.md").read_text()


def test_word_perplexity_tables_say_why_zh_is_huge():
    from lmeval_regions.eval.grid import Table

    t = Table("word_perplexity", ["Base"], ["en", "zh"], {"en": {"Base": 30.0},
                                                          "zh": {"Base": 1e230}})
    md = t.markdown()
    assert "without spaces" in md and "zh" in md and "token_perplexity" in md
    assert "without spaces" not in Table("token_perplexity", ["Base"], ["en"],
                                         {"en": {"Base": 3.0}}).markdown()


def test_corpora_snippet_runs(tiny_lm_dir, tmp_path):
    """docs/corpora.md's streaming importance, with its files and model replaced by small
    ones and its 2M-token budget by 40 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code = _snippet("docs/corpora.md", "cfg.streams(tokenizer)").code
    for lang, text in (("ar", "كل الناس أحرار ومتساوون في الكرامة والحقوق."),
                       ("es", "Todos los seres humanos nacen libres e iguales en dignidad.")):
        (tmp_path / f"{lang}.txt").write_text("\n".join([text] * 20), encoding="utf-8")
        code = code.replace(f"/data/{lang}.txt", str(tmp_path / f"{lang}.txt"))
    code = code.replace('tokens="2M"', 'tokens="40"')
    assert str(tmp_path) in code and 'tokens="40"' in code
    ns = {"model": AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
          "tokenizer": AutoTokenizer.from_pretrained(tiny_lm_dir)}
    exec(compile(code, "docs/corpora.md", "exec"), ns)
    assert ns["imp"].n_tokens == 40 and ns["imp"].languages == ["es"]
