"""Profile of ``lmeval-regions demo`` on the real Gemma-3-270M at small sizes, each phase against
the machine's limit measured in the same run.

The limit: a forward pass costs 2 FLOPs per weight per token in every linear layer (q/k/v/o,
gate/up/down in each block, and the 262k-row LM head, which is 62 % of Gemma-3-270M's) plus the
attention products; the machine does a plain ``torch.matmul`` of each of those shapes, at the
same number of rows (tokens per forward pass), at a measured rate. A phase's limit is the time
those matmuls alone take on its FLOPs; "x % of the limit" is limit / measured time. Backward
(importance) counts 2 more FLOPs per weight for the input gradients of every layer and 2 for
the weight gradients of the scored block matrices.

Measured side by side, rounds alternating between the conditions, medians reported:

* ``matmul``: GFLOP/s of each linear shape at the rows of each batch size (and 2048 rows);
* ``forward``: documents batched as lm-eval's ``hf`` batches them (consecutive documents,
  right-padded) and as ``hf-regions`` does (longest first, ``batch_order=length``): the blocks,
  the LM head, log-softmax over the vocabulary, argmax (lm-eval's greedy check);
* ``lm_eval``: ``simple_evaluate`` per condition (Base, Top 1 %) through
  :class:`~lmeval_regions.eval.grid.GridSession`: its total, the model calls, the
  log-softmax, tokenisation, and the rest (lm-eval's own work, edit/restore);
* ``importance``: the demo's importance pass (batches of 4 x up to 256 tokens), forward+backward;
* ``selection``: per-matrix Top/Bottom/Random of the importance just computed, monolingual
  (Eq. 5) of two languages, edit + restore of a region;
* ``io``: model load, importance/region save and load;
* ``projection``: the full demo's token counts times these per-token costs, against the limit.

    python benchmarks/bench_demo.py                  # a few minutes on 2 idle cores
    python benchmarks/bench_demo.py --batch-sizes 1,4,8,16 --rounds 5
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_demo.py   # torch's large buffers on huge pages

Writes ``benchmarks/results/bench_demo.json`` (with ``uptime`` load before and after: figures
taken on a busy machine are only good as ratios within the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def med(xs):
    return statistics.median(xs) if xs else None


def linear_shapes(model) -> list[tuple[str, int, int, int]]:
    """``(name, in, out, count)`` of the model's linear layers (one entry per distinct role),
    the LM head included."""
    import torch

    seen: dict[str, tuple[int, int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            role = name.split(".")[-1]
            k, n = mod.in_features, mod.out_features
            c = seen.get(role, (k, n, 0))[2]
            seen[role] = (k, n, c + 1)
    return [(r, k, n, c) for r, (k, n, c) in seen.items()]


def attention_flops_per_token(config, context: float) -> float:
    """QK^T and AV: 2 x 2 x heads x head_dim x context per layer and token (causal: half the
    context on average)."""
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", config.hidden_size // heads)
    return 4 * heads * hd * (context / 2) * config.num_hidden_layers


def matmul_rate(k: int, n: int, m: int, rounds: int) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` (median of ``rounds``, after one warm-up)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(a, b)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t)
    return 2 * m * k * n / med(ts) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--langs", default="ar,zh,vi,fi", help="evaluated languages (UDHR codes)")
    ap.add_argument("--limit", type=int, default=4, help="held-out units per language")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--importance-units", type=int, default=4,
                    help="UDHR units per language of the importance pass (2 languages)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from lmeval_regions.artefacts import write_text_atomic
    from lmeval_regions.corpora import batches, find_data_file, load_parallel
    from lmeval_regions.eval.grid import Condition, GridSession, LmEvalConfig
    from lmeval_regions.importance import Importance, ImportanceConfig, compute_importance
    from lmeval_regions.interventions import Editor
    from lmeval_regions.models import keep_freed_memory
    from lmeval_regions.paper import HELDOUT_START, PAPER1_TABLE5_LANGS, UDHR_FILE, UDHR_LANGS
    from lmeval_regions.regions import Region, monolingual, select_file

    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    langs = a.langs.split(",")
    report: dict = {"model": a.model, "threads": torch.get_num_threads(),
                    "cpu": _cpu(), "load_before": load(), "langs": langs, "limit": a.limit,
                    "batch_sizes": batch_sizes, "rounds": a.rounds,
                    "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    udhr = find_data_file(UDHR_FILE)

    # ---- io: model load through the session the demo uses
    sessions = {b: GridSession(a.model, LmEvalConfig(limit=a.limit, eval_batch_size=str(b),
                                                     model_args={"add_bos_token": False}),
                               {"dtype": "float32"}, "cpu") for b in batch_sizes}
    first = sessions[batch_sizes[0]]
    t0 = time.perf_counter()
    lm = first.lm
    io = {"model_load_s": time.perf_counter() - t0}
    # hf-regions on the CPU keeps freed memory (keep_host_memory, its default), as in the demo
    report["freed_memory_kept"] = keep_freed_memory()  # (idempotent: says it is in effect)
    for s in sessions.values():  # one model: the sessions differ only in lm-eval's batch size
        s._lm = lm if s is first else _with_batch_size(lm, s.options.batch_size())
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    shapes = linear_shapes(model)
    params = {r: k * n * c for r, k, n, c in shapes}
    print("linear shapes", shapes, flush=True)

    # ---- documents as lm-eval sees them (prefix token + text tokens)
    data = load_parallel(udhr, sorted(set(langs) | {"ar", "es"}))
    docs = [[lm.prefix_token_id] + lm.tok_encode(u["text"])
            for l in langs for u in data[l][HELDOUT_START:HELDOUT_START + a.limit]]
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        for l in langs:
            for u in data[l][HELDOUT_START:HELDOUT_START + a.limit]:
                lm.tok_encode(u["text"])
    tokens = sum(len(d) - 1 for d in docs)
    report["tokenisation"] = {"docs": len(docs), "tokens": tokens,
                              "us_per_token": (time.perf_counter() - t0) / a.rounds / tokens * 1e6}
    mean_len = tokens / len(docs)

    # ---- matmul rates at the rows each batch size gives, and at 2048 rows
    rows = sorted({max(1, round(mean_len * b)) for b in batch_sizes} | {2048})
    rates = {}
    for role, k, n, _ in shapes:
        for m in rows:
            rates[(role, m)] = matmul_rate(k, n, m, a.rounds)
    report["matmul"] = {f"{role}@{m}": round(r, 1) for (role, m), r in rates.items()}
    peak = max(rates.values())
    report["machine_peak_gflops"] = round(peak, 1)
    flops_tok = {"blocks": 2 * sum(v for r, v in params.items() if r != "lm_head"),
                 "lm_head": 2 * params.get("lm_head", 0),
                 "attention": attention_flops_per_token(cfg, mean_len)}
    report["flops_per_token"] = flops_tok
    print("matmul", report["matmul"], flush=True)

    # ---- forward phases: documents batched in request order (lm-eval's hf: consecutive
    # documents, right-padded to the longest) and longest first (hf-regions' batch_order)
    variants = [(b, "request") for b in batch_sizes] + [(b, "length") for b in batch_sizes
                                                        if b > 1]
    by_length = sorted(docs, key=len, reverse=True)
    fwd = {v: {"blocks": [], "lm_head": [], "log_softmax": [], "argmax": []} for v in variants}
    padded = {}
    for r in range(a.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            b, order = v
            seq = by_length if order == "length" else docs
            acc = dict.fromkeys(fwd[v], 0.0)
            pad = 0
            for i in range(0, len(seq), b):
                chunk = [d[:-1] for d in seq[i:i + b]]
                L = max(map(len, chunk))
                pad += L * len(chunk)
                x = torch.zeros(len(chunk), L, dtype=torch.long)
                for j, d in enumerate(chunk):
                    x[j, :len(d)] = torch.tensor(d)
                with torch.no_grad():
                    t = time.perf_counter()
                    h = model.model(x).last_hidden_state
                    t1 = time.perf_counter()
                    logits = model.lm_head(h)
                    t2 = time.perf_counter()
                    lsm = F.log_softmax(logits, dim=-1)
                    t3 = time.perf_counter()
                    lsm.argmax(-1)
                    t4 = time.perf_counter()
                for key, dt in zip(acc, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
                    acc[key] += dt
                del h, logits, lsm
            padded[v] = pad
            for key, t in acc.items():
                fwd[v][key].append(t)
    report["forward"] = {}
    for v in variants:
        b = v[0]
        m = max(1, round(mean_len * b))
        med_t = {k: med(t) for k, t in fwd[v].items()}
        lim_blocks = sum(2 * padded[v] * k * n * c / (rates[(r, m)] * 1e9)
                         for r, k, n, c in shapes if r != "lm_head")
        lim_head = 2 * padded[v] * params["lm_head"] / (rates[("lm_head", m)] * 1e9)
        useful = sum(2 * tokens * k * n * c / (peak * 1e9) for r, k, n, c in shapes)
        total = sum(med_t.values())
        name = str(b) if v[1] == "request" else f"{b} length-sorted"
        report["forward"][name] = {
            "seconds": med_t, "total_s": total, "tokens": tokens, "padded_tokens": padded[v],
            "ms_per_token": total / tokens * 1e3,
            "pct_of_limit": {"blocks": 100 * lim_blocks / med_t["blocks"],
                             "lm_head": 100 * lim_head / med_t["lm_head"],
                             "all (useful tokens at peak rate)": 100 * useful / total}}
        print("forward", name, report["forward"][name], flush=True)

    # ---- lm-eval per condition, Base and Top 1 % of an importance computed here
    imp_units = a.importance_units
    ibatches = []
    for l in ("ar", "es"):
        texts = [u["text"] for u in data[l][:imp_units]]
        ibatches += list(batches(tok, texts, 4, 256))
    itokens = sum(int(b["attention_mask"].sum()) for b in ibatches)
    ipadded = sum(b["input_ids"].numel() for b in ibatches)
    t0 = time.perf_counter()
    imp = compute_importance(model, ibatches, ImportanceConfig(), languages=["ar", "es"],
                             progress=False)
    isec = time.perf_counter() - t0
    m_imp = max(1, round(ipadded / len(ibatches)))
    for role, k, n, _ in shapes:
        rates.setdefault((role, m_imp), matmul_rate(k, n, m_imp, a.rounds))
    fwd_lim = sum(2 * ipadded * k * n * c / (rates[(r, m_imp)] * 1e9) for r, k, n, c in shapes)
    blk_lim = sum(2 * ipadded * k * n * c / (rates[(r, m_imp)] * 1e9)
                  for r, k, n, c in shapes if r != "lm_head")
    report["importance"] = {
        "seconds": isec, "batches": len(ibatches), "tokens": itokens, "padded_tokens": ipadded,
        "ms_per_token": isec / itokens * 1e3,
        # forward, input gradients of every layer, weight gradients of the scored blocks
        "flops_per_padded_token": 2 * (flops_tok["blocks"] + flops_tok["lm_head"])
        + flops_tok["blocks"],
        "pct_of_limit": 100 * (2 * fwd_lim + blk_lim) / isec}
    print("importance", report["importance"], flush=True)

    t0 = time.perf_counter()
    ipath = tmp / "imp.safetensors"
    imp.save(ipath)
    io["importance_save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Importance.load(ipath)
    io["importance_load_s"] = time.perf_counter() - t0

    sel = {}
    regions = {}
    for method in ("top", "bottom", "random"):
        ts = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            regions[method] = select_file(ipath, method, 0.01)
            ts.append(time.perf_counter() - t0)
        sel[f"{method}_per_matrix_s"] = med(ts)
    t0 = time.perf_counter()
    rpath = tmp / "top.safetensors"
    regions["top"].save(rpath)
    io["region_save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Region.load(rpath)
    io["region_load_s"] = time.perf_counter() - t0
    parts = {}
    for l in ("ar", "es"):
        one = [b for b in batches(tok, [u["text"] for u in data[l][:imp_units]], 4, 256)]
        parts[l] = tmp / f"{l}.safetensors"
        compute_importance(model, one, progress=False).save(parts[l])
    t0 = time.perf_counter()
    monolingual({l: select_file(p, "top", 0.01) for l, p in parts.items()},
                {l: select_file(p, "bottom", 0.01) for l, p in parts.items()})
    sel["monolingual_2_langs_s"] = time.perf_counter() - t0
    ed = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        with Editor(model) as e:
            e.apply(regions["top"], "zero")
        ed.append(time.perf_counter() - t0)
    sel["edit_restore_s"] = med(ed)
    report["selection"] = sel
    report["io"] = io
    print("selection", sel, "io", io, flush=True)

    # ---- lm-eval: each condition through the demo's session, instrumented
    tasks = [f"udhr_ppl_{l}" for l in langs]
    timing = {"model_call": 0.0, "log_softmax": 0.0, "tok_encode": 0.0}
    real_call, real_lsm, real_tok = lm._model_call, F.log_softmax, lm.tok_encode

    def timed(key, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timing[key] += time.perf_counter() - t
        return wrapper

    for s in sessions.values():  # each session's LM (copies share the weights)
        s.lm._model_call = timed("model_call", real_call)
        s.lm.tok_encode = timed("tok_encode", real_tok)
    F.log_softmax = timed("log_softmax", real_lsm)
    conds = {"Base": Condition("Base"), "Top 1%": Condition("Top 1%", region=str(rpath))}
    lme = {f"{label}@{b}": [] for label in conds for b in batch_sizes}
    values = {}
    try:
        for s in sessions.values():  # build the tasks, take the environment report (once)
            s.evaluate(conds["Base"], tasks)
        for r in range(a.rounds):
            for b in (batch_sizes if r % 2 == 0 else batch_sizes[::-1]):
                for label, c in conds.items():
                    for key in timing:
                        timing[key] = 0.0
                    t0 = time.perf_counter()
                    res = sessions[b].evaluate(c, tasks)
                    total = time.perf_counter() - t0
                    lme[f"{label}@{b}"].append({"total": total, **timing})
                    values[f"{label}@{b}"] = {t: res["results"][t]["token_perplexity,none"]
                                              for t in tasks}
    finally:
        for s in sessions.values():
            del s.lm._model_call, s.lm.tok_encode
        F.log_softmax = real_lsm
    report["lm_eval"] = {}
    for key, runs in lme.items():
        m = {k: med([x[k] for x in runs]) for k in runs[0]}
        b = int(key.split("@")[1])
        fwd_b = report["forward"][str(b) if b == 1 else f"{b} length-sorted"]
        m["other (lm-eval, edits, forward outside model call)"] = (
            m["total"] - m["model_call"] - m["log_softmax"] - m["tok_encode"])
        m["ms_per_token"] = m["total"] / tokens * 1e3
        m["pct_of_limit"] = 100 * (fwd_b["total_s"] * fwd_b["pct_of_limit"][
            "all (useful tokens at peak rate)"] / 100) / m["total"]
        report["lm_eval"][key] = m
    base1 = values[f"Base@{batch_sizes[0]}"]
    report["batched_vs_first_batch_size_max_rel_diff"] = {
        key: max(abs(v[t] / base1[t] - 1) if key.startswith("Base") else
                 abs(v[t] / values[f"Top 1%@{batch_sizes[0]}"][t] - 1) for t in tasks)
        for key, v in values.items()}
    print("lm_eval", json.dumps(report["lm_eval"], indent=1), flush=True)

    # ---- projection of the full demo (31 x 10 Table-1 documents x 4 conditions; 11 x 10
    # monolingual x 12 conditions, Base shared), from these per-token costs
    full = load_parallel(udhr, list(UDHR_LANGS))
    t1_tokens = sum(len(lm.tok_encode(u["text"])) for l in UDHR_LANGS
                    for u in full[l][HELDOUT_START:HELDOUT_START + 10])
    mono_tokens = sum(len(lm.tok_encode(u["text"])) for l in PAPER1_TABLE5_LANGS
                      for u in full[l][HELDOUT_START:HELDOUT_START + 10])
    eval_tokens = 4 * t1_tokens + 12 * mono_tokens
    imp_tokens = sum(min(256, len(tok.encode(u["text"], add_special_tokens=False)) + 1)
                     for l in ("ar", "es", "ru", "zh", "ko", "vi") for u in full[l][:25])
    proj = {"eval_tokens": eval_tokens, "importance_tokens": imp_tokens}
    for key, m in report["lm_eval"].items():
        if key.startswith("Top"):
            proj[f"eval_s@{key.split('@')[1]}"] = m["ms_per_token"] / 1e3 * eval_tokens
    proj["importance_s"] = report["importance"]["ms_per_token"] / 1e3 * imp_tokens
    per_tok = (flops_tok["blocks"] + flops_tok["lm_head"] + flops_tok["attention"])
    proj["eval_limit_s_at_peak"] = eval_tokens * per_tok / (peak * 1e9)
    proj["importance_limit_s_at_peak"] = imp_tokens * (2 * per_tok + flops_tok["blocks"]) / (
        peak * 1e9)
    report["projection"] = proj
    report["load_after"] = load()
    out = Path(a.out or Path(__file__).parent / "results" / "bench_demo.json")
    write_text_atomic(out, json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


def _with_batch_size(lm, batch_size):
    """The same loaded model under another lm-eval batch size (a shallow copy: one set of
    weights, one tokenizer)."""
    import copy

    other = copy.copy(lm)
    other.batch_size_per_gpu = batch_size
    return other


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
