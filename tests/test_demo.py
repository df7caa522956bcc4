"""`lmeval-regions demo --quick` end to end on a tiny model (report, plots, JSON, commands,
and a resumed second run that reuses every cached step)."""

from __future__ import annotations

import json

from lmeval_regions.cli import main


def test_demo_quick_tiny(tiny_lm_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model", str(tiny_lm_dir), "--out", str(out),
            "--langs", "ar,es,ru", "--eval-langs", "ar,es,en",
            "--mono-eval-langs", "ar,es,ru,en", "--texts",
            str(shared_data / "udhr_parallel_31.jsonl")]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    t1 = report["table1"]
    assert t1["metric"] == "token_perplexity"
    assert t1["columns"] == ["Base", "Top 1%", "Bottom 1%", "Random 1%"]
    for lang in ("ar", "es", "en"):
        cells = t1["cells"][lang]
        assert all(v > 1 for v in cells.values())
        # a tiny random model is no evidence for the paper's pattern, but zeroing changes it
        assert cells["Top 1%"] != cells["Base"]
    mono = report["monolingual"]
    assert mono["columns"] == ["Base", "ar Top", "ar Bottom", "es Top", "es Bottom",
                               "ru Top", "ru Bottom"]
    assert set(report["pattern"]["monolingual"]) >= {"ar", "es", "ru", "own_language_hurt_most"}
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Table 1" in md and "| ar |" in md
    commands = (out / "commands.sh").read_text()
    assert "lmeval-regions importance" in commands and "lm_eval --model hf-regions" in commands

    # a second run reuses the cached importance and every evaluated condition
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("reused") == 3 + 4 + 7, log
    again = json.loads((out / "report.json").read_text())
    assert again["table1"]["cells"] == t1["cells"]
