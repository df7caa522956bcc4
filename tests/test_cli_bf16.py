"""Every model-loading command runs on the CPU in bfloat16 (``--device cpu --dtype bfloat16``)
on a tiny model, through the real CLI entry point, at the smallest sizes.

Each case checks the exit code, the command's outputs, that every model it loaded from disk
had bfloat16 weights (a spy on ``from_pretrained``), and that its saved run config (and its
artefacts, where they record it) say bfloat16. The parametrized list must equal the set of
commands whose sections include :class:`ModelConfig`, so a new model-loading command fails
here until it has a bf16 run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import PreTrainedModel

from lmeval_regions.artefacts import read_metadata
from lmeval_regions.cli.main import commands, main
from lmeval_regions.models import ModelConfig

BF16 = ["--device", "cpu", "--dtype", "bfloat16"]
SMALL = ["--max-length", "32", "--batch-size", "2", "--quiet"]


def _model_commands() -> set[str]:
    return {c.name for c in commands() if ModelConfig in [cls for _, cls in c.sections]}


@pytest.fixture(scope="module")
def texts(shared_data: Path) -> str:
    return str(shared_data / "udhr_parallel_31.jsonl")


@pytest.fixture
def loaded(monkeypatch) -> list[set[torch.dtype]]:
    """The parameter dtypes of every model loaded from disk while the test runs (load_model
    and lm-eval's HFLM both go through ``PreTrainedModel.from_pretrained``)."""
    seen: list[set[torch.dtype]] = []
    original = PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls, *args: Any, **kwargs: Any):
        model = original(cls, *args, **kwargs)
        seen.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return seen


@pytest.fixture(scope="module")
def inputs(tiny_lm_dir: Path, texts: str, tmp_path_factory) -> dict[str, Path]:
    """Importance (bf16 model), a region extracted from it, and a LAPE release neuron file."""
    d = tmp_path_factory.mktemp("bf16_inputs")
    imp = d / "imp.safetensors"
    assert main(["importance", "--model", str(tiny_lm_dir), *BF16, "--texts", texts,
                 "--langs", "en,fr", "--units", "2", *SMALL, "--combine",
                 "--out", str(imp)]) == 0
    region = d / "top.safetensors"
    assert main(["extract", "--importance", str(imp), "--method", "top", "--ratio", "0.05",
                 "--out", str(region), "--quiet"]) == 0
    lape = d / "tiny.neuron.pth"
    # as the release's identify.py writes it: language -> layer -> neuron indices
    torch.save([[torch.tensor([1, 9]).long(), torch.tensor([4]).long()],
                [torch.tensor([0]).long(), torch.tensor([5, 63]).long()]], lape)
    return {"importance": imp, "region": region, "lape": lape}


def _config(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert doc["model"]["dtype"] == "bfloat16" and doc["model"]["device"] == "cpu", doc["model"]
    return doc


# Each case: (argv after the model flags, check(out folder)); {out} (the case's folder), {texts},
# {model}, {imp}, {region} and {lape} in the argv are filled in at run time.
Case = tuple[list[str], Callable[[Path], None]]


def _importance(out: Path) -> None:
    for lang in ("en", "fr"):
        meta = read_metadata(out / f"imp.{lang}.safetensors", "importance")
        assert meta["run"]["model"]["dtype"] == "bfloat16"
    assert (out / "imp.safetensors").is_file()
    _config(out / "imp.config.yaml")


def _activations(out: Path) -> None:
    from lmeval_regions.activations import Activations

    acts = Activations.load(out / "acts.safetensors")
    assert acts.languages == ["en", "fr"]
    _config(out / "acts.config.yaml")


def _neurons(out: Path) -> None:
    for name in ("README.md", "neurons.json", "neurons.safetensors", "activations.safetensors"):
        assert (out / "report" / name).is_file(), name
    doc = json.loads((out / "report" / "neurons.json").read_text())
    assert set(doc["deactivation"]["change"]) == {"en", "fr"}
    _config(out / "report" / "config.yaml")


def _sweep(out: Path) -> None:
    rows = json.loads((out / "sweep" / "sweep.json").read_text())
    assert len(rows) == 1 and (out / "sweep" / "sweep.md").is_file()
    _config(out / "sweep" / "config.yaml")


def _dims_report(out: Path) -> None:
    doc = json.loads((out / "dims" / "report.json").read_text())
    assert doc["importance"]["languages"] == ["en", "fr"] and doc["removal"]
    assert (out / "dims" / "report.md").is_file()
    _config(out / "dims" / "config.yaml")


def _dims(out: Path) -> None:
    rows = json.loads((out / "dims.json").read_text())
    assert rows and all(r["setting"] == "attn_heads" for r in rows)
    _config(out / "dims.config.yaml")


def _outliers(out: Path) -> None:
    assert "dims" in json.loads((out / "outliers.json").read_text())
    _config(out / "outliers.config.yaml")


def _plot(out: Path) -> None:
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    _config(out / "plots" / "config.yaml")


def _apply(out: Path) -> None:
    res = json.loads((out / "ppl.json").read_text())
    assert set(res["base"]) == {"en"} and res["edited"]["en"] != res["base"]["en"]
    # the saved model is the edited bf16 one
    saved = json.loads((out / "edited" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    _config(out / "edited" / "lmeval_regions.config.yaml")


def _lm_eval_results(folder: Path) -> None:
    """lm-eval's own record of each condition: a bf16 model whose log-softmax runs in fp32
    (``softmax_dtype``, see ``ModelConfig.hf_model_args``), and the region edits applied."""
    results = list(folder.glob("*.json"))
    assert results
    for path in results:
        config = json.loads(path.read_text())["config"]
        assert config["model_dtype"] == "torch.bfloat16", path
        if config["model_args"] is not None:  # None: the grid passed its loaded LM object
            assert "softmax_dtype=float32" in str(config["model_args"]), path
        edits = (config["regions"] or {}).get("edits") or []
        assert (path.stem == "base") == (not edits) and all(e["entries"] > 0 for e in edits)


def _table(out: Path) -> None:
    table = json.loads((out / "table" / "table.json").read_text())
    assert table["columns"] == ["Base", "Top 5%"] and table["rows"] == ["udhr_ppl_en"]
    assert table["meta"]["task_metadata"]["dtype"] == "bfloat16"
    # In bf16 with lm-eval's default (log-softmax and sums in the model dtype) the Top-5%
    # cell equalled Base exactly; with the sums in fp32 the removal shows.
    for row in table["cells"].values():
        assert row["Base"] != row["Top 5%"], table["cells"]
    _lm_eval_results(out / "table" / "results")
    _config(out / "table" / "config.yaml")


def _demo(out: Path) -> None:
    report = json.loads((out / "demo" / "report.json").read_text())
    assert report["table1"]["columns"] == ["Base", "Top 5%"]
    for row in report["table1"]["cells"].values():  # the removal shows in bf16 (fp32 sums)
        assert row["Base"] != row["Top 5%"], report["table1"]["cells"]
    assert report["config"]["model"]["dtype"] == "bfloat16"
    for lang in ("en", "fr"):
        meta = read_metadata(out / "demo" / "importance" / f"{lang}.safetensors", "importance")
        assert meta["demo"]["dtype"] == "bfloat16"
    _lm_eval_results(out / "demo" / "table1" / "results")
    _lm_eval_results(out / "demo" / "monolingual" / "results")
    _config(out / "demo" / "config.yaml")


def _further_pretrain(out: Path) -> None:
    result = json.loads((out / "fpt" / "result.json").read_text())
    runs = {r["mode"]: r for r in result["runs"]}
    assert set(runs) == {"full", "freeze"}
    assert runs["freeze"]["max_abs_change_in_region"] == 0.0  # frozen bit for bit in bf16 too
    _config(out / "fpt" / "config.yaml")


def _robustness(out: Path) -> None:
    report = json.loads((out / "rob" / "report.json").read_text())
    assert report["languages"] == ["en", "fr"]
    assert (out / "rob" / "report.md").is_file()
    _config(out / "rob" / "config.yaml")


def _import_neurons(out: Path) -> None:
    from lmeval_regions.neurons import NeuronSet

    assert NeuronSet.load(out / "lape.safetensors").sets == ["en", "zh"]
    _config(out / "lape.config.yaml")


CORPUS = ["--texts", "{texts}", *SMALL]
CASES: dict[str, Case] = {
    "importance": (["--langs", "en,fr", "--units", "2", *CORPUS, "--combine",
                    "--out", "{out}/imp.safetensors"], _importance),
    "activations": (["--langs", "en,fr", "--units", "2", *CORPUS,
                     "--out", "{out}/acts.safetensors"], _activations),
    "neurons": (["--langs", "en,fr", "--units", "2", *CORPUS, "--eval-langs", "en,fr",
                 "--eval-units", "1", "--out", "{out}/report"], _neurons),
    "neuron-sweep": (["--models", "{model}", "--langs", "en,fr", "--units", "2", *CORPUS,
                      "--out", "{out}/sweep"], _sweep),
    # its own importance pass (no --importance): that runs in bf16 too
    "dims-report": (["--langs", "en,fr", "--units", "1", *CORPUS, "--eval-units", "1",
                     "--outlier-units", "1", "--n-dims", "1", "--top-dims", "1",
                     "--new-tokens", "2", "--ratio", "0.05", "--out", "{out}/dims"],
                    _dims_report),
    "dims": (["{region}", "--langs", "en", *CORPUS, "--eval-units", "1", "--settings",
              "attn_heads", "--methods", "top,random", "--n-dims", "1",
              "--out", "{out}/dims.json"], _dims),
    "outliers": (["--langs", "en", "--units", "1", *CORPUS, "--out", "{out}/outliers.json"],
                 _outliers),
    "plot-region": (["{region}", "--max-px", "16", "--out", "{out}/plots", "--quiet"], _plot),
    "apply": (["--edit", "{region}@zero", "--langs", "en", *CORPUS, "--eval-units", "1",
               "--json", "{out}/ppl.json", "--save", "{out}/edited"], _apply),
    "table": (["--importance", "{imp}", "--methods", "top", "--ratios", "0.05",
               "--tasks", "udhr_ppl_en", "--limit", "1", "--metadata", "udhr_path={texts}",
               "--out", "{out}/table", "--quiet"], _table),
    "demo": (["--quick", "--langs", "en,fr", "--units", "1", *CORPUS, "--eval-langs", "en",
              "--mono-eval-langs", "en", "--eval-limit", "1", "--methods", "top",
              "--ratios", "0.05", "--mono-ratio", "0.05", "--out", "{out}/demo"], _demo),
    "further-pretrain": (["--langs", "en,fr", "--units", "2", *CORPUS, "--lang", "fr",
                          "--modes", "full,freeze", "--steps", "2", "--eval-every", "2",
                          "--lr", "1e-2", "--eval-langs", "en", "--eval-units", "1",
                          "--ratio", "0.05", "--out", "{out}/fpt"], _further_pretrain),
    "robustness": (["--langs", "en,fr", "--units", "4", *CORPUS, "--criteria",
                    "sum_abs,magnitude", "--ratios", "0.05", "--eval-units", "1",
                    "--out", "{out}/rob"], _robustness),
    "import-neurons": (["--file", "{lape}", "--languages", "en,zh", "--out",
                        "{out}/lape.safetensors", "--quiet"], _import_neurons),
}
# Reads the model's config only (meta device): no weights, so nothing is loaded in any dtype.
NO_WEIGHTS = {"import-neurons"}


def test_every_model_loading_command_has_a_bf16_case():
    assert set(CASES) == _model_commands()


@pytest.mark.parametrize("name", sorted(CASES))
def test_command_runs_on_cpu_in_bf16(name: str, tiny_lm_dir: Path, texts: str,
                                     inputs: dict[str, Path], loaded: list[set[torch.dtype]],
                                     tmp_path: Path):
    argv, check = CASES[name]
    names = {"out": tmp_path, "texts": texts, "model": tiny_lm_dir, "imp": inputs["importance"],
             "region": inputs["region"], "lape": inputs["lape"]}
    argv = [a.format(**names) for a in argv]
    assert main([name, "--model", str(tiny_lm_dir), *BF16, *argv]) == 0
    check(tmp_path)
    if name in NO_WEIGHTS:
        assert loaded == []
    else:
        assert loaded and all(dtypes == {torch.bfloat16} for dtypes in loaded), loaded
