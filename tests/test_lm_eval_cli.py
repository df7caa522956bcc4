"""Plain ``lm_eval`` and ``lm-eval-regions`` in a subprocess, and the install-time ``.pth``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from lm_eval_helpers import TASK, udhr_texts, write_ppl_task

REPO = Path(__file__).resolve().parent.parent
SPEC = "model.layers.0.mlp.down_proj.weight[:, 5]"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared_data):
    return write_ppl_task(tmp_path_factory.mktemp("tasks"), udhr_texts(shared_data))


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_all(cmds: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    """Run the CLI commands side by side (each mostly waits on lm-eval's task indexing)."""
    procs = {k: subprocess.Popen(c + ["--output_path", str(tmp / k)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_env())
             for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{k}: {err[-3000:]}"
        files = sorted((tmp / k).rglob("results_*.json"))
        assert files, err[-2000:]
        out[k] = json.loads(files[-1].read_text())
    return out


def _exe(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(exe).exists(), f"console script {name} not installed (pip install -e .)"
    return exe


def test_plain_lm_eval_cli_and_console_script(tiny_lm_dir, task_dir, tmp_path):
    """`lm_eval --model hf-regions` (found through the .pth hook) and `lm-eval-regions --model
    hf` (built-ins not hidden) give exactly the numbers of the Python API runs of the same
    models; the zero region changes them and is recorded in the results."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    common = ["--tasks", TASK, "--include_path", str(task_dir), "--device", "cpu",
              "--batch_size", "1"]
    base_args = f"pretrained={tiny_lm_dir},dtype=float32"
    runs = _run_all({
        "plain": [_exe("lm_eval"), "--model", "hf-regions", "--model_args",
                  f"{base_args},region={SPEC}"] + common,
        "ours": [_exe("lm-eval-regions"), "--model", "hf", "--model_args", base_args] + common,
    }, tmp_path)
    api = {}
    for name, model, extra in (("plain", "hf-regions", {"region": SPEC}), ("ours", "hf", {})):
        api[name] = lm_eval.simple_evaluate(
            model=model, model_args={"pretrained": str(tiny_lm_dir), "dtype": "float32", **extra},
            tasks=[TASK], batch_size=1, device="cpu",
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    key = "word_perplexity,none"
    for name in runs:
        assert runs[name]["results"][TASK][key] == api[name]["results"][TASK][key], name
    assert runs["plain"]["results"][TASK][key] != runs["ours"]["results"][TASK][key]
    edits = runs["plain"]["config"]["regions"]["edits"]
    assert edits[0]["target"] == SPEC and edits[0]["entries"] == 32
    assert "regions" not in runs["ours"]["config"]


def _build(backend_call: str, src: Path, out: Path) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); "
            f"from setuptools import build_meta as b; print(b.{backend_call}({str(out)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = out / proc.stdout.strip().splitlines()[-1]
    return zipfile.ZipFile(wheel).namelist()


def test_wheels_install_the_pth_hook(tmp_path):
    """Both a regular wheel (`pip install .`) and an editable one (`pip install -e .`) put
    lmeval_regions_lm_eval.pth at the root of site-packages."""
    from lmeval_regions._pth_build import PTH_NAME

    src = tmp_path / "src"  # build a copy: building in the checkout would write build/ there
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "lmeval_regions", "tasks", "trainer_ext"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / item).exists():
            shutil.copy(REPO / item, src / item)
    (tmp_path / "w").mkdir()
    (tmp_path / "e").mkdir()
    assert PTH_NAME in _build("build_wheel", src, tmp_path / "w")
    assert PTH_NAME in _build("build_editable", src, tmp_path / "e")


def test_hook_registers_without_hiding_builtins():
    """The import hook, installed before lm-eval is imported, registers hf-regions lazily and
    keeps the built-in models (get_model only imports them into an empty registry)."""
    code = ("import os, sys; from lmeval_regions.eval import hook as h; "
            "assert 'lm_eval' not in sys.modules; os.environ.pop('LMEVAL_REGIONS_NO_HOOK'); "
            "h.install(); from lm_eval.api.registry import get_model; "
            "print(get_model('hf').__name__, get_model('hf-regions').__name__)")
    # LMEVAL_REGIONS_NO_HOOK=1 disables the site-packages .pth: install() above is the only hook
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**_env(), "LMEVAL_REGIONS_NO_HOOK": "1"}, timeout=300)
    assert out.stdout.split() == ["HFLM", "HFRegionsLM"], out.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", "from lm_eval.api.registry import model_registry"
                          " as r; print('hf-regions' in r)"], capture_output=True, text=True,
                         env={**_env(), "LMEVAL_REGIONS_NO_HOOK": "1"}, timeout=300)
    assert off.stdout.split() == ["False"], off.stderr[-2000:]  # the test above is not vacuous


def test_table_command_tiny_grid(tiny_lm_dir, shared_data, tmp_path):
    """`lmeval-regions table` on a tiny model, 2 languages: Table-1 layout, and each cell equals
    an independent lm-eval run of the same condition."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from lmeval_regions.artefacts import model_fingerprint
    from lmeval_regions.cli import main
    from lmeval_regions.importance import Importance

    tasks = tmp_path / "tasks"
    for lang in ("en", "fr"):
        write_ppl_task(tasks, udhr_texts(shared_data, (lang,), 2), name=f"tiny_ppl_{lang}")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()
              if ".layers." in n and p.dim() == 2}
    Importance(scores, "abs_sum", model_fingerprint(model), ["en"]).save(
        tmp_path / "imp.safetensors")

    out = tmp_path / "table"
    rc = main(["table", "--model", str(tiny_lm_dir),
               "--importance", str(tmp_path / "imp.safetensors"),
               "--methods", "top,random", "--ratios", "0.05", "--tasks", "tiny_ppl_en,tiny_ppl_fr",
               "--include-path", str(tasks), "--metric", "word_perplexity", "--out", str(out)])
    assert rc == 0
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["Base", "Top 5%", "Random 5%"]
    assert table["rows"] == ["en", "fr"]
    md = (out / "table.md").read_text()
    assert "| Language | Base | Top 5% | Random 5% |" in md
    # the table says what it evaluated: model, documents (no --limit: all), batch size
    assert f"Model {tiny_lm_dir}; every document of each task (no --limit); lm-eval batch " \
           "size 1." in md

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    top, = (out / "regions").glob("top_0.05_matrix_*.safetensors")  # the grid's name for it
    for col, extra in (("Base", {}), ("Top 5%", {"region": str(top)})):
        res = lm_eval.simple_evaluate(
            model="hf-regions",
            model_args={"pretrained": str(tiny_lm_dir), "dtype": "float32", **extra},
            tasks=["tiny_ppl_en", "tiny_ppl_fr"], task_manager=manager, batch_size=1, device="cpu")
        for lang in ("en", "fr"):
            assert (table["cells"][lang][col]
                    == res["results"][f"tiny_ppl_{lang}"]["word_perplexity,none"])
    assert table["cells"]["en"]["Top 5%"] != table["cells"]["en"]["Base"]


@pytest.mark.parametrize("argv, match", [
    (["--ratios", "0.01,x"], "--ratios"),
    (["--ratios", "3"], "outside"),
    (["--methods", "tops"], "tops"),
    (["--regions", "nolabel"], "LABEL="),
])
def test_table_bad_arguments(argv, match, capsys):
    from lmeval_regions.cli import main

    rc = main(["table", "--model", "x", "--tasks", "t", "--out", "/nonexistent/o"] + argv)
    assert rc == 2 and match in capsys.readouterr().err


def test_accelerate_data_parallel_applies_regions_on_every_rank(tiny_lm_dir, shared_data,
                                                                tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank loads the model and applies the
    region itself, so the pooled results equal the single-process run with the region, and
    differ from the run without it (a rank without the edit would change the numbers)."""
    texts = udhr_texts(shared_data, ("en", "fr", "de"), n=2)  # 6 docs: 3 per rank
    task_dir = write_ppl_task(tmp_path / "tasks", texts)
    common = ["--tasks", TASK, "--include_path", str(task_dir), "--device", "cpu",
              "--batch_size", "1"]
    base = f"pretrained={tiny_lm_dir},dtype=float32"
    region = "model.layers.*.mlp.down_proj.weight@scale:30"  # large effect on a tiny model
    runs = _run_all({
        "dp": [_exe("accelerate"), "launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "lmeval_regions.eval.console", "--model", "hf-regions",
               "--model_args", f"{base},region={region}"] + common,
        "single": [_exe("lm-eval-regions"), "--model", "hf-regions",
                   "--model_args", f"{base},region={region}"] + common,
        "unedited": [_exe("lm-eval-regions"), "--model", "hf", "--model_args", base] + common,
    }, tmp_path)
    key = "word_perplexity,none"
    dp, single = runs["dp"]["results"][TASK][key], runs["single"]["results"][TASK][key]
    assert dp == pytest.approx(single, rel=1e-6)
    assert single != pytest.approx(runs["unedited"]["results"][TASK][key], rel=1e-4)
    assert runs["dp"]["config"]["regions"]["edits"][0]["entries"] == 2 * 32 * 64
