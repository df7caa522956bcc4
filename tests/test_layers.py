"""The package's architecture is enforced: the layer contracts of pyproject.toml (import-linter)
hold, and there are no import cycles and no private names imported across modules. Each check
is shown to fail on a planted violation, so none of them can pass vacuously."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("lmeval_regions", "trainer_ext")


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "tasks" in parts[1:2]:  # the lm-eval task folder is a separate, symlinked tree
            continue
        out[".".join(parts)] = path
    return out


def import_graph(base: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``(module -> modules it imports, [private cross-module imports])`` of our packages."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        mods.update(_modules(base / pkg))
    graph: dict[str, set[str]] = defaultdict(set)
    private = []
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    target = ".".join(parts[:len(parts) - node.level + 1])
                    target += f".{node.module}" if node.module else ""
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    t = full if full in mods else target if target in mods else None
                    if t and t != mod:
                        graph[mod].add(t)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{mod} <- {t}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != mod:
                        graph[mod].add(alias.name)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_tree(tmp: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__",
                                                                             "tasks"))
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def test_no_cycles_and_no_private_imports():
    graph, private = import_graph(REPO)
    assert cycles(graph) == []
    assert private == []
    assert len(graph) > 40  # the scan saw the package


def test_checks_catch_a_planted_cycle_and_private_import(tmp_path):
    base = _copy_tree(tmp_path)
    low = base / "lmeval_regions" / "errors.py"
    low.write_text(low.read_text() + "\nfrom lmeval_regions.parsing import _planted  # noqa\n")
    graph, private = import_graph(base)
    assert ["lmeval_regions.errors", "lmeval_regions.parsing"] in cycles(graph)
    assert private == ["lmeval_regions.errors <- lmeval_regions.parsing._planted"]


def test_layer_contracts_hold_and_catch_an_upward_import(tmp_path):
    ok = _lint_imports(REPO)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "broken" in ok.stdout and "0 broken" in ok.stdout
    base = _copy_tree(tmp_path)
    region = base / "lmeval_regions" / "regions" / "region.py"
    region.write_text(region.read_text() + "\nfrom lmeval_regions.cli.main import main  # noqa\n")
    bad = _lint_imports(base)
    assert bad.returncode != 0
    assert "lmeval_regions.regions.region -> lmeval_regions.cli.main" in bad.stdout
