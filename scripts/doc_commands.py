"""The commands and Python snippets written in README.md and docs/*.md, as data.

Used by ``tests/test_docs.py`` (every documented command runs or is parsed by the real parsers)
and ``scripts/first_hour.py`` (the README's commands run in order). A *command* is a shell line
in a code block (fenced, any language but python/yaml/json, or indented by four spaces) or an
inline code span that starts with one of :data:`PROGRAMS` (after ``VAR=value`` assignments and
``nice -n N``); backslash continuations are joined, comments dropped, ``&&`` chains split.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = ("lmeval-regions", "lm_eval", "lm-eval-regions", "python", "python3", "bash")
NOT_SHELL = ("python", "py", "yaml", "yml", "json", "text", "markdown", "md")


@dataclass
class DocCommand:
    file: str
    """The markdown file (relative to the repository)."""
    line: int
    """1-based line where the command starts."""
    text: str
    """The command as one shell line (continuations joined, no comment)."""
    argv: list[str]
    """Its words (shlex), starting at the program: env assignments and ``nice`` dropped."""
    env: dict[str, str]
    """``VAR=value`` assignments written before it."""
    inline: bool = False
    """From an inline code span in prose rather than a code block."""

    @property
    def program(self) -> str:
        return self.argv[0]

    @property
    def mention(self) -> bool:
        """A subcommand named in prose (`lmeval-regions table`), not a command to run."""
        return self.inline and self.program == "lmeval-regions" and len(self.argv) == 2

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


@dataclass
class Snippet:
    file: str
    line: int
    code: str


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, first line number, lines)`` of fenced and indented code blocks."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)", lines[i])
        if m:
            lang, start, body = m.group(2).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((lang, start, body))
            i += 1
            continue
        prev_blank = i == 0 or not lines[i - 1].strip()
        if prev_blank and lines[i].startswith("    ") and lines[i].strip() \
                and not re.match(r"^\s*([-*+]|\d+\.)\s", lines[i]):
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            out.append(("indented", start, body))
            continue
        i += 1
    return out


def _split_words(text: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(text, comments=True)
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    if words[:1] == ["nice"]:
        words.pop(0)
        if words[:1] == ["-n"]:
            words = words[2:]
    return env, words


def _commands_in(text: str, file: str, line: int, inline: bool) -> list[DocCommand]:
    out = []
    for part in re.split(r"\s&&\s", text):
        part = part.strip()
        if not part:
            continue
        try:
            env, argv = _split_words(part)
        except ValueError:  # unbalanced quotes: not a command we can read
            continue
        if argv and argv[0] in PROGRAMS:
            out.append(DocCommand(file, line, " ".join(part.split()), argv, env, inline))
    return out


def commands(path: Path, root: Path) -> list[DocCommand]:
    """Every command of one markdown file, in document order."""
    text = path.read_text(encoding="utf-8")
    rel = str(path.relative_to(root))
    found: list[tuple[int, DocCommand]] = []
    fenced_lines: set[int] = set()
    for lang, start, body in _blocks(text):
        fenced_lines.update(range(start - 1, start + len(body) + 1))
        if lang in NOT_SHELL:
            continue
        buf, first = "", None
        for k, raw in enumerate(body):
            line = raw.rstrip()
            if first is None:
                first = start + k
            stripped = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            buf += stripped
            for c in _commands_in(buf, rel, first, False):
                found.append((first, c))
            buf, first = "", None
    # inline code spans of prose (outside code blocks), e.g. `lmeval-regions model-path NAME`
    prose = "\n".join("" if i in fenced_lines else l
                      for i, l in enumerate(text.splitlines()))
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        span = " ".join(m.group(1).split())
        if span.split(" ", 1)[0] in PROGRAMS and " " in span:
            line = prose.count("\n", 0, m.start()) + 1
            for c in _commands_in(span, rel, line, True):
                found.append((line, c))
    return [c for _, c in sorted(found, key=lambda lc: lc[0])]


def snippets(path: Path, root: Path) -> list[Snippet]:
    """Every ```python block of one markdown file."""
    text = path.read_text(encoding="utf-8")
    rel = str(path.relative_to(root))
    return [Snippet(rel, start, "\n".join(body)) for lang, start, body in _blocks(text)
            if lang in ("python", "py")]


def doc_files(root: Path) -> list[Path]:
    """README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
