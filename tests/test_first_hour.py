"""A newcomer's first hour: scripts/first_hour.py runs every command of README.md in order on a
tiny model (installs, the test suite and benchmarks are listed as not run, with the reason)
and each finishes with exit 0 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import doc_commands as D  # noqa: E402


@pytest.mark.slow
def test_first_hour_on_a_tiny_model(tiny_lm_dir, tmp_path):
    out = tmp_path / "first_hour.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "first_hour.py"), "--model", str(tiny_lm_dir),
         "--work", str(tmp_path / "work"), "--json", str(out), "--timeout", "1800"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    readme = D.commands(REPO / "README.md", REPO)
    assert [s["readme"] for s in doc["steps"]] == [c.text for c in readme]  # all, in order
    ran = [s for s in doc["steps"] if "skipped" not in s]
    skipped = {s["readme"]: s["skipped"] for s in doc["steps"] if "skipped" in s}
    assert all(s["ok"] and s["rc"] == 0 for s in ran)
    assert len(ran) >= 14
    # what is not run, and only that (a subcommand named in prose is a mention, not a command)
    mentions = {c.text for c in readme if c.mention}
    assert all(t in mentions or t.startswith(("bash scripts/install.sh", "python3 -m pytest",
                                              "python benchmarks/",
                                              "python scripts/first_hour.py",
                                              "lmeval-regions demo --quick"))
               for t in skipped), skipped
    names = {s["run"].split()[1] for s in ran if s["run"].startswith("lmeval-regions ")}
    assert {"demo", "importance", "extract", "stats", "monolingual", "apply", "table",
            "further-pretrain", "neurons", "dims-report", "model-path"} <= names
    assert {s["run"].split()[0] for s in ran} >= {"lm_eval", "lm-eval-regions"}
    work = tmp_path / "work"
    assert (work / "top1.safetensors").exists() and (work / "table1" / "table.md").exists()
    assert len(list((work / "mono").glob("*.top.safetensors"))) == 6
