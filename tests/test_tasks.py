"""The lm-eval task suite in tasks/: every task runs offline from ../shared/data on a tiny model,
and its figures agree with direct computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lmeval_regions.errors import RegionsError
from lmeval_regions.eval.tasks import task_manager, tasks_path

LIMIT = 3


def _evaluate(tiny_lm_dir, tasks, limit=LIMIT, metadata=None, **model_args):
    from lm_eval import simple_evaluate

    args = {"pretrained": str(tiny_lm_dir), "dtype": "float32", **model_args}
    meta = {"pretrained": str(tiny_lm_dir), **(metadata or {})}
    return simple_evaluate(model="hf", model_args=args, tasks=tasks, limit=limit, device="cpu",
                           task_manager=task_manager(metadata=meta, include_defaults=False),
                           log_samples=True)


def _ppl_docs(results, task):
    """(loglikelihood, text) of each logged document of a perplexity task."""
    return [(s["filtered_resps"][0], s["target"]) for s in results["samples"][task]]


def test_tasks_path_is_the_installed_folder():
    p = tasks_path()
    assert (p / "perplexity" / "udhr_ppl.yaml").is_file()
    out = subprocess.run([sys.executable, "-m", "lmeval_regions.cli", "tasks-path"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(p)


def test_suite_indexes_every_task():
    tm = task_manager(include_defaults=False)
    from lmeval_regions.paper import UDHR_LANGS

    want = ([f"udhr_ppl_{l}" for l in UDHR_LANGS] + ["udhr_ppl", "udhr_ppl_paper1", "text_ppl",
            "mmlu_local", "mmlu_hub", "arabicmmlu_local", "arabicmmlu_filtered",
            "arabicmmlu_hub", "xstorycloze_xl", "xstorycloze_xl_es", "xstorycloze_xl_hub",
            "case_studies", "flores_ppl", "xlsum_ppl"])
    missing = [t for t in want if t not in tm.all_tasks]
    assert not missing, missing


def test_every_task_runs_offline(tiny_lm_dir, shared_data, tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("first line of text\n\nsecond line here\n", encoding="utf-8")
    r = _evaluate(tiny_lm_dir, ["udhr_ppl", "text_ppl", "mmlu_local", "arabicmmlu_local",
                                "arabicmmlu_filtered", "xstorycloze_xl", "case_studies"],
                  limit=2, metadata={"text_path": str(txt)})
    res = r["results"]
    from lmeval_regions.paper import UDHR_LANGS

    for l in UDHR_LANGS:
        t = res[f"udhr_ppl_{l}"]
        assert t["sample_len"] == 2
        assert 1 < t["token_perplexity,none"] < 1e9 and t["bits_per_byte,none"] > 0
    # held-out units are 25..49 by default
    assert [s["doc"]["id"] for s in r["samples"]["udhr_ppl_en"]] == ["udhr.art18.1", "udhr.art19.1"]
    assert res["text_ppl"]["sample_len"] == 2 and res["text_ppl"]["word_count,none"] == 7
    for t in ("mmlu_local", "arabicmmlu_local", "arabicmmlu_filtered"):
        assert 0 <= res[t]["acc,none"] <= 1 and 0 < res[t]["prob_a,none"] < 1
    assert all(s["doc"]["Answer Key"] != "A" for s in r["samples"]["arabicmmlu_filtered"])
    langs = ["ru", "zh", "es", "ar", "hi", "id", "te", "sw", "eu", "my"]
    assert all(res[f"xstorycloze_xl_{l}"]["sample_len"] == 2 for l in langs)
    gens = r["samples"]["case_studies"]
    assert [g["doc"]["prompt"] for g in gens] == ["There are 365 days in a year and 12",
                                                   "Fudan University is located in"]
    assert all(isinstance(g["resps"][0][0], str) and g["resps"][0][0] for g in gens)


def test_xstorycloze_prompt_is_story_in_x_with_english_endings(shared_data):
    from lmeval_regions.tasks.xstorycloze_xl.xsc import load_local

    rows = [json.loads(l) for l in open(shared_data / "xstorycloze_eval100_11lang.jsonl")]
    es = load_local("es")["test"][0]
    src = next(r for r in rows if r["lang"] == "es" and r["InputStoryid"] == es["id"])
    en = next(r for r in rows if r["lang"] == "en" and r["InputStoryid"] == es["id"])
    assert es["story"] == " ".join(src[f"InputSentence{i}"] for i in range(1, 5))
    assert es["endings"] == [en["RandomFifthSentenceQuiz1"], en["RandomFifthSentenceQuiz2"]]
    assert es["label"] == int(en["AnswerRightEnding"]) - 1


def _direct_nll(model, ids, prefix, max_len):
    """Σ NLL of ``ids`` scored as lm-eval's rolling windows: blocks of ``max_len`` predicted
    tokens, the first conditioned on ``prefix``, later ones on the preceding tokens (a full
    window of ``max_len`` inputs), each computed with the model's own loss."""
    seq = [prefix] + ids
    nll, start = 0.0, 0  # start: index in ids of the first token predicted by this window
    while start < len(ids):
        end = min(start + max_len, len(ids))
        inp_end = end  # inputs are seq[.. end] (= prefix + ids[:end-1] shifted by one)
        inp_start = max(0, inp_end - max_len)
        inp = torch.tensor([seq[inp_start:inp_end + 1]])
        labels = inp.clone()
        labels[0, : start - inp_start + 1] = -100  # context positions are not predicted
        out = model(input_ids=inp, labels=labels)
        nll += float(out.loss) * (end - start)
        start = end
    return nll


def test_token_perplexity_equals_direct_loss(tiny_lm_dir, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_len = 64
    r = _evaluate(tiny_lm_dir, ["udhr_ppl_de"], limit=LIMIT, max_length=max_len)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    windows = []
    with torch.no_grad():
        for _, text in _ppl_docs(r, "udhr_ppl_de"):
            ids = tok.encode(text)
            windows.append(math.ceil(len(ids) / max_len))
            nll += _direct_nll(model, ids, tok.bos_token_id, max_len)
            n += len(ids)
    assert max(windows) > 1, windows  # the check covers the rolling (later-window) path
    got = r["results"]["udhr_ppl_de"]
    assert got["token_count,none"] == n
    assert got["token_perplexity,none"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["nll_sum,none"] == pytest.approx(nll, rel=1e-5)


def test_pooled_perplexity_by_hand(tiny_lm_dir, shared_data):
    from transformers import AutoTokenizer

    from lmeval_regions.tasks.perplexity.ppl import pooled_perplexity

    r = _evaluate(tiny_lm_dir, ["udhr_ppl_paper1"], limit=1)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    nll = toks = nbytes = 0
    per_lang = []
    for task in r["group_subtasks"]["udhr_ppl_paper1"]:
        docs = _ppl_docs(r, task)
        t_nll = -sum(ll for ll, _ in docs)
        t_tok = sum(len(tok.encode(text)) for _, text in docs)
        nll, toks = nll + t_nll, toks + t_tok
        nbytes += sum(len(text.encode("utf-8")) for _, text in docs)
        per_lang.append(math.exp(t_nll / t_tok))
    assert len(per_lang) == 30
    pooled = pooled_perplexity(r, group="udhr_ppl_paper1")
    assert pooled["tasks"] == 30 and pooled["token_count"] == toks
    assert pooled["token_perplexity"] == pytest.approx(math.exp(nll / toks), rel=1e-9)
    assert pooled["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-9)
    # lm-eval's own group figure is the (unit-weighted) mean of per-language perplexities
    mean = r["results"]["udhr_ppl_paper1"]["token_perplexity,none"]
    assert mean == pytest.approx(sum(per_lang) / len(per_lang), rel=1e-6)
    with pytest.raises(RegionsError, match="not one of our perplexity tasks"):
        pooled_perplexity({"results": {"x": {"acc,none": 1.0}}}, tasks=["x"])


def test_mean_probability_of_a_by_hand(tiny_lm_dir, shared_data):
    r = _evaluate(tiny_lm_dir, ["mmlu_local", "arabicmmlu_local"], limit=4)
    for task in ("mmlu_local", "arabicmmlu_local"):
        probs, accs = [], []
        for s in r["samples"][task]:
            lls = [ll for ll, _ in s["filtered_resps"]]
            z = sum(math.exp(x) for x in lls)
            probs.append(math.exp(lls[0]) / z)
            d = s["doc"]
            gold = d["answer"] if task == "mmlu_local" else "ABCDE".index(d["Answer Key"])
            accs.append(float(lls.index(max(lls)) == gold))
        assert r["results"][task]["prob_a,none"] == pytest.approx(sum(probs) / len(probs), rel=1e-6)
        assert r["results"][task]["acc,none"] == pytest.approx(sum(accs) / len(accs))


def test_hendrycks_csv_layout(tmp_path):
    from lmeval_regions.tasks.mmlu.mcq import load_mmlu

    d = tmp_path / "data" / "test"
    d.mkdir(parents=True)
    (d / "high_school_physics_test.csv").write_text('"What, is x?",1,2,3,4,C\nQ2,a,b,c,d,A\n')
    rows = load_mmlu(str(tmp_path / "data"))["test"]
    assert rows[0] == {"question": "What, is x?", "subject": "high_school_physics",
                       "choices": ["1", "2", "3", "4"], "answer": 2}
    (d / "bad_test.csv").write_text("only,three,fields\n")
    with pytest.raises(RegionsError, match="hendrycks columns"):
        load_mmlu(str(d))


def test_bad_inputs_name_the_problem(tmp_path):
    from lmeval_regions.eval.ppl_task import load_text, load_udhr, tokenizer_source

    with pytest.raises(RegionsError, match="text_path"):
        load_text()
    with pytest.raises(RegionsError, match="udhr_heldout_start=60"):
        load_udhr("en", udhr_heldout_start=60)
    with pytest.raises(RegionsError, match="language 'xx'"):
        load_udhr("xx")
    with pytest.raises(RegionsError, match="needs the model's tokenizer"):
        tokenizer_source({"config_source": "x"})
    assert len(load_udhr("en", udhr_heldout_start=0)["test"]) == 50


def test_lm_eval_cli_subprocess(tiny_lm_dir, shared_data, tmp_path):
    """The plain lm_eval CLI finds our tasks with --include_path; token counts work there
    because the CLI merges model_args into the task metadata."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={tiny_lm_dir},dtype=float32",
           "--tasks", "udhr_ppl_en,mmlu_local", "--include_path", str(tasks_path()),
           "--limit", "2", "--device", "cpu", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())["results"]
    assert res["udhr_ppl_en"]["token_count,none"] > 0
    assert res["udhr_ppl_en"]["token_perplexity,none"] > 1
    assert 0 < res["mmlu_local"]["prob_a,none"] < 1


def _token_counts_agree_with_lm_eval(tokenizer_dir, texts):
    """PerplexityTask's token count = len(HFLM.tok_encode(text)) (lm-eval's own method, called
    on a stand-in with the same tokenizer) for every add_bos_token setting."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from lmeval_regions.tasks.perplexity.ppl import PerplexityTask

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seen = set()
    for add_bos in (None, True, False):
        lm = SimpleNamespace(tokenizer=tok, add_bos_token=add_bos, prefix_token_id=prefix)
        meta = {"pretrained": str(tokenizer_dir)}
        if add_bos is not None:
            meta["add_bos_token"] = add_bos
        task = PerplexityTask.__new__(PerplexityTask)  # only _count_tokens is exercised
        task._tokenizer, task._config = None, SimpleNamespace(metadata=meta)
        for text in texts:
            n = len(HFLM.tok_encode(lm, text))
            assert task._count_tokens(text) == n, (add_bos, text)
            seen.add((add_bos, n))
    return seen


def test_token_counts_agree_with_lm_eval(tiny_lm_dir):
    _token_counts_agree_with_lm_eval(tiny_lm_dir, ["Hello world", "<|im_start|>x"])


@pytest.mark.slow
def test_token_counts_agree_with_lm_eval_bos_tokenizer():
    """Gemma's tokenizer prepends BOS by default: lm-eval then scores it (see docs/tasks.md)."""
    from lmeval_regions.models import resolve_pretrained

    seen = _token_counts_agree_with_lm_eval(resolve_pretrained("gemma-3-270m"),
                                            ["Hello world", "<bos>Hello world"])
    assert (None, 3) in seen and (False, 2) in seen  # BOS counted by default, not with False


@pytest.mark.slow
def test_gemma_token_perplexity_with_add_bos_false_is_paper_metric(gemma, shared_data):
    """On Gemma-3-270M with add_bos_token=False, lm-eval's token perplexity equals the direct
    "BOS as conditioning only" computation of lmeval_regions.perplexity.perplexity."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lmeval_regions.corpora import load_parallel
    from lmeval_regions.models import resolve_pretrained
    from lmeval_regions.perplexity import perplexity

    model, tok = gemma
    lm = HFLM(pretrained=model, tokenizer=tok, add_bos_token=False, batch_size=1)
    langs = ["en", "zh"]
    r = simple_evaluate(model=lm, tasks=[f"udhr_ppl_{l}" for l in langs], limit=2,
                        task_manager=task_manager(include_defaults=False, metadata={
                            "pretrained": resolve_pretrained("gemma-3-270m"),
                            "add_bos_token": False}))
    units = load_parallel(langs=langs)
    for l in langs:
        want = perplexity(model, tok, [u["text"] for u in units[l][25:27]], max_length=4096)
        got = r["results"][f"udhr_ppl_{l}"]
        assert got["token_count,none"] == want["tokens"]
        assert got["token_perplexity,none"] == pytest.approx(want["ppl"], rel=1e-5)
