"""The `table` grid passes lm-eval task metadata and task options to every condition (issue 16,
item 4): its cells equal plain ``lm_eval --model hf-regions`` runs with the same --metadata and
--num_fewshot, Base and a zeroed region alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmeval_regions.errors import RegionsError
from lmeval_regions.eval.grid import Condition, GridSession, LmEvalConfig, run_grid
from lmeval_regions.eval.ppl_task import load_text
from lmeval_regions.eval.tasks import tasks_path

SPEC = "model.layers.0.mlp.down_proj.weight[:, 5]"
TEXTS = ["All human beings are born free and equal in dignity and rights.",
         "Everyone has the right to life, liberty and security of person.",
         "No one shall be held in slavery or servitude."]
QUESTIONS = [("What is two plus two?", ["3", "4", "5", "6"], "B"),
             ("Which is a colour?", ["red", "dog", "run", "seven"], "A"),
             ("Which number is prime?", ["4", "6", "8", "7"], "D")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("grid_data")
    text = d / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    mmlu = d / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": q, "subject": "toy", "A": c[0], "B": c[1],
                                        "C": c[2], "D": c[3], "answer": a}) + "\n"
                            for q, c, a in QUESTIONS), encoding="utf-8")
    return {"text_path": str(text), "mmlu_path": str(mmlu)}


def _lm_eval(model_args: str, metadata: dict, out: Path) -> subprocess.Popen:
    exe = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    cmd = [exe, "--model", "hf-regions", "--model_args", model_args,
           "--tasks", "text_ppl,mmlu_local", "--include_path", str(tasks_path()),
           "--metadata", json.dumps(metadata), "--num_fewshot", "1",
           "--device", "cpu", "--batch_size", "1", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _results(proc: subprocess.Popen, out: Path) -> dict:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, err[-2000:]
    return json.loads(files[-1].read_text())


KEYS = {"text_ppl": ("token_perplexity,none", "word_perplexity,none", "token_count,none"),
        "mmlu_local": ("acc,none", "prob_a,none")}


def test_grid_equals_plain_lm_eval_with_metadata_and_fewshot(tiny_lm_dir, data, tmp_path):
    base_args = f"pretrained={tiny_lm_dir},dtype=float32"
    # the plain CLI runs (side by side; each mostly waits on lm-eval's task indexing)
    procs = {"Base": _lm_eval(base_args, data, tmp_path / "cli_base"),
             "Zero": _lm_eval(f"{base_args},region={SPEC}", data, tmp_path / "cli_zero")}
    opts = LmEvalConfig(metadata=json.dumps(data), num_fewshot=1)
    table = run_grid(str(tiny_lm_dir), [Condition("Base"), Condition("Zero", region=SPEC)],
                     ["text_ppl", "mmlu_local"], tmp_path / "grid", lm_eval_config=opts,
                     log=lambda m: None)
    cli = {"Base": _results(procs["Base"], tmp_path / "cli_base"),
           "Zero": _results(procs["Zero"], tmp_path / "cli_zero")}
    for label in ("Base", "Zero"):
        grid = json.loads((tmp_path / "grid" / "results" / f"{label.lower()}.json").read_text())
        # the metadata reached the loaders: every document of both local files was evaluated
        assert grid["results"]["text_ppl"]["sample_len"] == len(TEXTS)
        assert grid["results"]["mmlu_local"]["sample_len"] == len(QUESTIONS)
        assert grid["n-shot"]["mmlu_local"] == cli[label]["n-shot"]["mmlu_local"] == 1
        for task, keys in KEYS.items():
            for k in keys:
                assert grid["results"][task][k] == cli[label]["results"][task][k], (label, task, k)
    tp = "token_perplexity,none"
    assert cli["Zero"]["results"]["text_ppl"][tp] != cli["Base"]["results"]["text_ppl"][tp]
    assert table.cells["text_ppl"]["Base"] == cli["Base"]["results"]["text_ppl"][tp]
    assert json.loads((tmp_path / "grid" / "table.json").read_text())["meta"]["options"][
        "num_fewshot"] == 1
    # the same grid from the command line: `lmeval-regions table --metadata JSON --num-fewshot 1`
    from lmeval_regions.cli import main

    assert main(["table", "--model", str(tiny_lm_dir), "--device", "cpu", "--tasks",
                 "text_ppl,mmlu_local", "--regions", f"Zero={SPEC}", "--metadata",
                 json.dumps(data), "--num-fewshot", "1", "--metric", "token_perplexity",
                 "--out", str(tmp_path / "cmd"), "--quiet"]) == 0
    cells = json.loads((tmp_path / "cmd" / "table.json").read_text())["cells"]["text_ppl"]
    assert cells == {label: cli[label]["results"]["text_ppl"][tp] for label in ("Base", "Zero")}


def test_text_ppl_without_path_names_the_real_flag():
    with pytest.raises(RegionsError) as e:
        load_text()
    msg = str(e.value)
    assert "--metadata '{\"text_path\"" in msg and "lmeval-regions table" in msg


@pytest.mark.parametrize("kw,match", [({"metadata": "[1, 2]"}, "not a JSON object"),
                                      ({"metadata": "{text_path: x}"}, "is not JSON"),
                                      ({"num_fewshot": -1}, "num_fewshot -1"),
                                      ({"fewshot_as_multiturn": True}, "needs apply_chat_template"),
                                      ({"gen_kwargs": "max_gen_toks=5,greedy"}, "not key=value"),
                                      ({"method_batch_size": "tops=1"},
                                       "'tops' is not one of .*Did you mean: top"),
                                      ({"method_batch_size": "top=0"}, "top=0: the batch size")])
def test_options_refuse_bad_values(kw, match):
    with pytest.raises(RegionsError, match=match):
        LmEvalConfig(**kw)


def test_method_batch_size_applies_to_its_columns_only(tiny_lm_dir, monkeypatch):
    """--method-batch-size top=1 over --eval-batch-size 4: lm-eval runs the Top column at 1
    (the LM object's batch size, which lm-eval reads, and the recorded one) and every other
    column at 4; the model's batch size is put back after each, also when lm-eval fails; the
    batch size is part of the column's resume key."""
    import lm_eval

    session = GridSession(str(tiny_lm_dir), LmEvalConfig(eval_batch_size="4",
                                                         method_batch_size="top=1"))
    monkeypatch.setattr(session, "_tasks", lambda tasks: [])
    seen = []

    def fake(model, batch_size, **kw):
        seen.append((model.batch_size_per_gpu, batch_size))
        if len(seen) == 4:
            raise RuntimeError("lm-eval failed")
        return {}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    top, bottom = Condition("Top 1%", "top", 0.01), Condition("Bottom 1%", "bottom", 0.01)
    for c in (Condition("Base"), top, bottom):
        session.evaluate(c, ["text_ppl"])
    assert seen == [(4, 4), (1, 1), (4, 4)]
    with pytest.raises(RuntimeError, match="lm-eval failed"):
        session.evaluate(top, ["text_ppl"])
    assert session.lm.batch_size_per_gpu == 4
    assert json.loads(session.key(top, ["t"]))["args"]["batch_size"] == "1"
    assert json.loads(session.key(bottom, ["t"]))["args"]["batch_size"] == "4"
    # base=N: the column without a region (not a given region file, which has no method)
    session.options = LmEvalConfig(eval_batch_size="4", method_batch_size="base=1,top=2")
    seen.clear()
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda model, batch_size, **kw: seen.append(
                            (model.batch_size_per_gpu, batch_size)) or {})
    monkeypatch.setattr(session.lm, "apply_edits", lambda *a, **k: [])
    for c in (Condition("Base"), top, bottom, Condition("mine", region="r.safetensors")):
        session.evaluate(c, ["text_ppl"])
    assert seen == [(1, 1), (2, 2), (4, 4), (4, 4)]
