"""A newcomer's first hour: every command of README.md, in order, on one model.

    python scripts/first_hour.py --model smollm2-135m            # small sizes (default)
    python scripts/first_hour.py --model /path/to/tiny --json first_hour.json

Each command runs in a fresh work folder through bash (so ``$(lmeval-regions tasks-path)``
works as typed), with the README's embedded model names replaced by ``--model`` and, with
``--sizes small`` (the default), flags appended that shrink the work (fewer units, shorter
sequences, ``--limit`` for lm-eval, ``--quick`` for the demo) without changing what runs.
A step fails on a non-zero exit or a traceback. Printed: each step's wall time and the machine's
load average (timings on a shared machine need re-measuring on an idle one).

Not run, with the reason printed: installing (``bash scripts/install.sh`` installs from PyPI),
the test suite (``python3 -m pytest``), the benchmarks (minutes to hours; their flags are
checked by tests/test_docs.py) and this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_commands as D  # noqa: E402

EMBEDDED = ("gemma-3-270m", "smollm2-135m")
SMALL = {  # appended to a subcommand's flags with --sizes small (later flags win in argparse)
    "importance": "--units 2 --max-length 64 --batch-size 2",
    "apply": "--eval-units 1 --max-length 64",
    "table": "--limit 2",
    "further-pretrain": "--steps 2 --eval-every 1 --units 2 --eval-units 1 --max-length 64 "
                        "--batch-size 2",
    "neurons": "--units 2 --eval-units 1 --max-length 64 --batch-size 8",
    "dims-report": "--units 2 --eval-units 1 --max-length 64 --outlier-units 1 --n-dims 1 "
                   "--top-dims 1 --new-tokens 4",
    "demo": "--quick --units 2 --langs ar,es --eval-langs en,ar --mono-eval-langs en,ar "
            "--eval-limit 1 --max-length 64",
}
SKIP = [
    (r"^bash scripts/install\.sh", "installs from PyPI: not run here"),
    (r"^python3? -m pytest", "the test suite itself"),
    (r"^python3? benchmarks/", "a benchmark (minutes to hours); its flags are checked by "
                               "tests/test_docs.py"),
    (r"^python3? scripts/first_hour\.py", "this script"),
]


def model_commands() -> set[str]:
    """Subcommands that load a model (take --model)."""
    from lmeval_regions.cli.main import commands
    from lmeval_regions.models import ModelConfig

    return {c.name for c in commands() if any(cls is ModelConfig for _, cls in c.sections)}


def adapt(c: D.DocCommand, model: str, sizes: str, loads: set[str]) -> str:
    """The command to run: the model substituted, sizes shrunk."""
    text = re.sub(r"\s+#.*$", "", c.text)
    for name in EMBEDDED:
        text = re.sub(rf"(?<=[ =]){re.escape(name)}(?=[ ,]|$)", shlex.quote(model), text)
    text = text.replace(" NAME", " " + shlex.quote(model))
    argv = c.argv
    extra = ""
    if c.program == "lmeval-regions" and len(argv) > 1:
        sub = argv[1]
        if sub in loads and "--model" not in argv:
            extra += f" --model {shlex.quote(model)}"
        if sizes == "small":
            extra += " " + SMALL.get(sub, "")
    elif c.program in ("lm_eval", "lm-eval-regions") and sizes == "small":
        extra += " --limit 2"
    return (text + extra).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="embedded name or model folder that replaces the README's models")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--sizes", choices=("small", "readme"), default="small",
                    help="small: shrink the work; readme: run exactly as written (long)")
    ap.add_argument("--json", default=None, help="write the steps and timings here")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per step")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="first_hour."))
    work.mkdir(parents=True, exist_ok=True)
    loads = model_commands()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    steps, seen = [], set()
    print(f"work folder {work}; model {args.model}; sizes {args.sizes}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for c in D.commands(REPO / "README.md", REPO):
        reason = next((why for pat, why in SKIP if re.match(pat, c.text)), None)
        if c.mention:
            reason = reason or "a subcommand named in prose, not a command"
        if c.inline and c.program == "lmeval-regions" and len(c.argv) > 1 \
                and c.argv[1] == "demo":
            reason = reason or "the demo already ran (the Quick start command)"
        cmd = adapt(c, args.model, args.sizes, loads)
        if reason is None and cmd in seen:
            reason = "ran above"
        step = {"line": c.line, "readme": c.text, "run": cmd}
        if reason:
            step.update(skipped=reason)
            print(f"[skip] README.md:{c.line}: {c.text}\n       ({reason})", flush=True)
            steps.append(step)
            continue
        seen.add(cmd)
        load = os.getloadavg()[0]
        t0 = time.time()
        print(f"[run ] README.md:{c.line}: {cmd}", flush=True)
        try:
            res = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True,
                                 text=True, timeout=args.timeout)
            rc, out = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = 124, f"timed out after {args.timeout} s: {e}"
        wall = time.time() - t0
        ok = rc == 0 and "Traceback (most recent call last)" not in out
        step.update(rc=rc, seconds=round(wall, 1), load_before=round(load, 1), ok=ok,
                    tail=out[-3000:] if not ok else out[-300:])
        steps.append(step)
        print(f"       {'ok' if ok else 'FAILED'} in {wall:.1f} s (exit {rc}, load "
              f"{load:.1f})", flush=True)
        if not ok:
            print(out[-3000:], file=sys.stderr)
            break
    failed = [s for s in steps if "skipped" not in s and not s["ok"]]
    doc = {"model": args.model, "sizes": args.sizes, "work": str(work),
           "cores": os.cpu_count(), "steps": steps,
           "total_seconds": round(sum(s.get("seconds", 0) for s in steps), 1),
           "ok": not failed}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"{'all steps ran' if not failed else 'FAILED'}: "
          f"{sum('skipped' not in s for s in steps)} run, "
          f"{sum('skipped' in s for s in steps)} skipped, {doc['total_seconds']} s in all")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
