"""`lmeval-regions demo --quick` end to end on a tiny model (report, plots, JSON, commands,
and a resumed second run that reuses every cached step), and its numbers against the plain
per-condition path: importance computed on a freshly loaded model, regions selected from it in
memory, and one plain lm-eval run of ``hf-regions`` per condition."""

from __future__ import annotations

import json
import math

import lm_eval
import lm_eval.evaluator
import pytest
import torch

from lmeval_regions.cli import main
from lmeval_regions.corpora import batches, load_parallel
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import Importance, combine, compute_importance
from lmeval_regions.models import load_model
from lmeval_regions.regions import monolingual, select_from_importance

LANGS = ["ar", "es", "ru"]
EVAL_LANGS = ["ar", "es", "en"]
MONO_EVAL_LANGS = ["ar", "es"]  # among EVAL_LANGS: the monolingual table takes Table 1's Base


def _demo(tiny_lm_dir, shared_data, out, batch_size):
    return ["demo", "--quick", "--model", str(tiny_lm_dir), "--out", str(out),
            "--langs", ",".join(LANGS), "--eval-langs", ",".join(EVAL_LANGS),
            "--mono-eval-langs", ",".join(MONO_EVAL_LANGS), "--eval-batch-size", str(batch_size),
            "--texts", str(shared_data / "udhr_parallel_31.jsonl")]


@pytest.fixture(scope="module")
def demo_run(tiny_lm_dir, shared_data, tmp_path_factory):
    """The fast path (one model, shared Base, cached steps) at lm-eval's batch size 1.

    On one thread, as the tests' plain path: a module fixture is made before the autouse
    per-test thread setting, and a matmul split over two threads rounds differently."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_demo(tiny_lm_dir, shared_data, out, 1)) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "report.json").read_text())


def test_demo_quick_tiny(demo_run, tiny_lm_dir, shared_data, capsys):
    out, report = demo_run
    t1 = report["table1"]
    assert t1["metric"] == "token_perplexity"
    assert t1["columns"] == ["Base", "Top 1%", "Bottom 1%", "Random 1%"]
    for lang in EVAL_LANGS:
        cells = t1["cells"][lang]
        assert all(v > 1 for v in cells.values())
        # a tiny random model is no evidence for the paper's pattern, but zeroing changes it
        assert cells["Top 1%"] != cells["Base"]
    mono = report["monolingual"]
    assert mono["columns"] == ["Base", "ar Top", "ar Bottom", "es Top", "es Bottom",
                               "ru Top", "ru Bottom"]
    assert set(report["pattern"]["monolingual"]) >= {"ar", "es", "own_language_hurt_most"}
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Table 1" in md and "| ar |" in md
    # the report, the commands and the table say what THIS run did (issue 14.9)
    assert f"sum over these {len(LANGS)} languages" in md and ", ".join(LANGS) in md
    commands = (out / "commands.sh").read_text()
    assert "lmeval-regions importance" in commands and "lm_eval --model hf-regions" in commands
    assert f"--tasks {','.join(f'udhr_ppl_{l}' for l in EVAL_LANGS)} " in commands
    assert "udhr_ppl_fi" not in commands  # a language this run did not evaluate
    limit = report["config"]["demo"]["eval_limit"]
    assert f"--limit {limit:g}: the first {limit:g} documents of each task" in \
        (out / "table1" / "table.md").read_text()
    # Base of the monolingual table is Table 1's, restricted to its languages: evaluated once
    base = json.loads((out / "monolingual" / "results" / "base.json").read_text())
    assert base["lmeval_regions_taken_from"].endswith("table1/results/base.json")
    assert sorted(base["results"]) == [f"udhr_ppl_{l}" for l in sorted(MONO_EVAL_LANGS)]

    # a second run reuses the cached importance, core sum, regions and every evaluated
    # condition, and never loads the model
    capsys.readouterr()
    assert main(_demo(tiny_lm_dir, shared_data, out, 1)) == 0
    log = capsys.readouterr().out
    # 3 languages + core + monolingual regions + 3 Table-1 regions + 4 + 7 conditions
    assert log.count("reused") == 3 + 1 + 1 + 3 + 4 + 7, log
    again = json.loads((out / "report.json").read_text())
    assert again["table1"]["cells"] == t1["cells"]
    assert "model_load" not in again["seconds"]


def _plain_path(tiny_lm_dir, shared_data, report):
    """Every number of the report the slow way: the model loaded for importance, regions
    selected from in-memory importances, one plain lm-eval run (its own model load, task
    and tasks) per condition and table, lm-eval's default batch size."""
    corpus = report["config"]["corpus"]
    udhr = shared_data / "udhr_parallel_31.jsonl"
    model, tok = load_model(str(tiny_lm_dir))
    data = load_parallel(udhr, LANGS)
    lo, hi = corpus["skip"], corpus["skip"] + corpus["units"]
    imps = {l: compute_importance(
        model, list(batches(tok, [u["text"] for u in data[l][lo:hi]], corpus["batch_size"],
                            corpus["max_length"])), progress=False) for l in LANGS}
    core = combine(list(imps.values()))
    regions = {f"{m.capitalize()} 1%": select_from_importance(core, m, 0.01, seed=0)
               for m in ("top", "bottom", "random")}
    tops = {l: select_from_importance(i, "top", 0.01) for l, i in imps.items()}
    bottoms = {l: select_from_importance(i, "bottom", 0.01) for l, i in imps.items()}
    for l, pair in monolingual(tops, bottoms).items():
        regions[f"{l} Top"], regions[f"{l} Bottom"] = pair["top"], pair["bottom"]
    return imps, regions


def _plain_cells(tiny_lm_dir, shared_data, regions, labels, langs, limit, tmp_path,
                 monkeypatch):
    # One index of our task folder (lm-eval's own thousands of YAMLs take ~10 s to index and
    # are not used), the tasks built from it afresh by each run; lm-eval's environment report
    # (a `pip list` per run) left out: neither touches a number.
    from lm_eval.tasks import TaskManager

    from lmeval_regions.eval.tasks import tasks_path

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)
    base = {"pretrained": str(tiny_lm_dir), "add_bos_token": False, "device": "cpu"}
    tm = TaskManager(include_path=str(tasks_path()), include_defaults=False,
                     metadata={**base, "udhr_path": str(shared_data / "udhr_parallel_31.jsonl")})
    cells = {}
    for label in labels:
        args = dict(base)
        if label != "Base":
            path = tmp_path / f"{label.replace(' ', '_').replace('%', 'pct')}.safetensors"
            regions[label].save(path)
            args["region"] = str(path)
        res = lm_eval.simple_evaluate(model="hf-regions", model_args=args, task_manager=tm,
                                      tasks=[f"udhr_ppl_{l}" for l in langs], limit=limit,
                                      batch_size=1)
        for l in langs:
            cells.setdefault(l, {})[label] = res["results"][f"udhr_ppl_{l}"][
                "token_perplexity,none"]
    return cells


def test_demo_numbers_equal_the_plain_per_condition_path(demo_run, tiny_lm_dir, shared_data,
                                                         tmp_path, monkeypatch):
    # At batch size 1 the computation is the same, so every number is bit-identical: the
    # importance files, and each cell of both tables (Base of the monolingual table included,
    # which the fast path takes from Table 1's run).
    out, report = demo_run
    imps, regions = _plain_path(tiny_lm_dir, shared_data, report)
    for l, imp in imps.items():
        mine = Importance.load(out / "importance" / f"{l}.safetensors")
        assert all(torch.equal(mine.scores[n], imp.scores[n]) for n in imp.scores), l
    limit = report["config"]["demo"]["eval_limit"]
    t1 = report["table1"]
    plain = _plain_cells(tiny_lm_dir, shared_data, regions, t1["columns"], EVAL_LANGS, limit,
                         tmp_path, monkeypatch)
    assert {l: t1["cells"][l] for l in EVAL_LANGS} == plain
    mono = report["monolingual"]
    plain = _plain_cells(tiny_lm_dir, shared_data, regions, mono["columns"], MONO_EVAL_LANGS,
                         limit, tmp_path, monkeypatch)
    assert {l: mono["cells"][l] for l in MONO_EVAL_LANGS} == plain


def test_batched_demo_agrees_to_1e5(demo_run, tiny_lm_dir, shared_data, tmp_path):
    # lm-eval batches of 4 documents: the same values up to the summation order of the matrix
    # products (and the same regions: the importance pass is unchanged).
    out, report = demo_run
    batched = tmp_path / "demo_b4"
    assert main(_demo(tiny_lm_dir, shared_data, batched, 4) + ["--table1-batch-size", "1"]) == 0
    other = json.loads((batched / "report.json").read_text())
    assert other["config"]["demo"]["eval_batch_size"] == 4
    assert other["table1"]["meta"]["options"]["eval_batch_size"] == "4"
    # Table 1's columns (and Base, shared with the monolingual table) at batch 1 whatever
    # --eval-batch-size: the computation of the batch-1 run, so the same bits -- cells and
    # every number derived from them
    assert other["table1"]["meta"]["options"]["method_batch_size"] == {
        "top": 1, "bottom": 1, "random": 1, "base": 1}
    for table in ("table1", "monolingual"):
        a, b = report[table]["cells"], other[table]["cells"]
        assert a.keys() == b.keys()
        for row in a:
            for col, v in a[row].items():
                if table == "table1" or col == "Base":
                    assert b[row][col] == v, (table, row, col)
                assert math.isclose(b[row][col], v, rel_tol=1e-5), (table, row, col)
    assert other["pattern"]["table1"] == report["pattern"]["table1"]
    commands = (batched / "commands.sh").read_text()
    assert "--method-batch-size top=1,bottom=1,random=1,base=1" in commands



def test_table1_batch_size_defaults():
    """Table 1 at lm-eval batch 1 by default (the plain runs' values); --quick, which promises
    the verdicts, at --eval-batch-size unless the flag is given; bad values refused by name."""
    from lmeval_regions.studies.demo import DemoConfig

    assert DemoConfig(eval_batch_size=4).table1_batch_size == 1
    assert DemoConfig(eval_batch_size=4, quick=True).table1_batch_size == 4
    assert DemoConfig(eval_batch_size=4, quick=True, table1_batch_size=1).table1_batch_size == 1
    for bad in (0, True, "2"):
        with pytest.raises(RegionsError, match=f"--table1-batch-size {bad!r} must be"):
            DemoConfig(table1_batch_size=bad)
