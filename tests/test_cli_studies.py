"""The study commands from the command line on a tiny model: `further-pretrain` and
`robustness` run end to end from their generated flags and leave their config beside the
report."""

from __future__ import annotations

import json

import yaml

from lmeval_regions.cli import main


def test_further_pretrain_command(tiny_lm_dir, shared_data, tmp_path):
    out = tmp_path / "fpt"
    assert main(["further-pretrain", "--model", str(tiny_lm_dir), "--device", "cpu",
                 "--texts", str(shared_data / "udhr_parallel_31.jsonl"), "--langs", "en,fr",
                 "--units", "2", "--max-length", "16", "--batch-size", "2",
                 "--lang", "fr", "--modes", "full,freeze,remove_freeze", "--steps", "2",
                 "--eval-every", "2",
                 "--lr", "1e-2", "--eval-langs", "en", "--eval-units", "1", "--ratio", "0.05",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    runs = {r["mode"]: r for r in result["runs"]}
    assert set(runs) == {"full", "freeze", "remove_freeze"}
    assert runs["freeze"]["max_abs_change_in_region"] == 0.0
    assert runs["remove_freeze"]["max_abs_value_in_region"] == 0.0
    assert set(runs["full"]["curve"][-1]["ppl"]) == {"fr", "en"}  # target first, then held out
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["command"] == "further-pretrain" and doc["recipe"]["steps"] == 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_robustness_command(tiny_lm_dir, shared_data, tmp_path):
    out = tmp_path / "rob"
    assert main(["robustness", "--model", str(tiny_lm_dir), "--device", "cpu",
                 "--texts", str(shared_data / "udhr_parallel_31.jsonl"), "--langs", "en,fr",
                 "--units", "4", "--max-length", "16", "--batch-size", "2",
                 "--criteria", "sum_abs,magnitude", "--ratios", "0.05", "--eval-units", "1",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["languages"] == ["en", "fr"] and report["max_length"] == 16
    assert (out / "report.md").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["robustness"]["criteria"] == [
        "sum_abs", "magnitude"]
