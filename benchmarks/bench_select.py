"""Selection over a synthetic importance artefact shaped like LLaMA-2-7B's block weights.

32 layers x (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008) = 6.48 B entries,
stored bf16 (~13 GB), written tensor by tensor (:func:`lmeval_regions.artefacts.write_safetensors`).
Each measurement runs in a fresh subprocess and reports its wall time and peak RSS
(``ru_maxrss``); selections are timed against plain sequential reads of the same file.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_select.py            # full 7B shape
    OMP_NUM_THREADS=1 python benchmarks/bench_select.py --layers 2            # scaled down

With ``--cli`` the same selections also run as ``lmeval-regions extract`` (the command a
researcher types), each in a fresh process whose own peak RSS is read with ``os.wait4``, beside
the CLI's start-up alone (``extract --help``: interpreter, torch, the package)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_select.py --cli --ratio 0.01

Issue 15 (extraction near disk speed, both threads used): every scope x method from the CLI,
each against the warm sequential read of the file, taken before and after the cases in the same
run (the median is the base), with all of the machine's threads (no OMP_NUM_THREADS)::

    python benchmarks/bench_select.py --cli --methods top,bottom,middle,random --max-load 3

``--max-load`` waits (up to an hour) until the 1-minute load average is at most that before
writing the file and before each case; the load is recorded beside every figure.

Writes ``benchmarks/results/bench_select[_L<layers>].json``; deletes the artefact afterwards
unless ``--keep`` (``--keep --reuse`` measures a kept one again without writing 13 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER = 4096, 11008
MATRICES = {  # LLaMA-2-7B block weights: name -> shape
    "self_attn.q_proj.weight": [HIDDEN, HIDDEN], "self_attn.k_proj.weight": [HIDDEN, HIDDEN],
    "self_attn.v_proj.weight": [HIDDEN, HIDDEN], "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
    "mlp.gate_proj.weight": [INTER, HIDDEN], "mlp.up_proj.weight": [INTER, HIDDEN],
    "mlp.down_proj.weight": [HIDDEN, INTER],
}


def layout(n_layers: int) -> dict[str, tuple[torch.dtype, list[int]]]:
    return {f"model.layers.{i}.{m}": (torch.bfloat16, s)
            for i in range(n_layers) for m, s in MATRICES.items()}


def generate(path: Path, n_layers: int, seed: int = 0) -> dict:
    """Positive scores, log-uniform over 2^-31..2^17 (random bf16 bit patterns: cheap to make
    at 6.5 B entries), one piece in memory at a time."""
    from lmeval_regions.artefacts import model_fingerprint, write_safetensors

    lay = layout(n_layers)
    g = torch.Generator().manual_seed(seed)

    def produce(name):
        _, shape = lay[name]
        rows_per = max(1, (1 << 24) // shape[1])  # ~16M entries per piece
        for r in range(0, shape[0], rows_per):
            bits = torch.randint(0x3000, 0x4880, (min(rows_per, shape[0] - r), shape[1]),
                                 dtype=torch.int16, generator=g)
            yield bits.view(torch.bfloat16)

    fp = model_fingerprint({n: s for n, (_, s) in lay.items()})
    t = time.perf_counter()
    write_safetensors(path, lay, produce, {"mode": "abs_sum", "model": fp, "synthetic": True},
                      kind="importance")
    return {"seconds": time.perf_counter() - t, "bytes": path.stat().st_size,
            "entries": sum(torch.Size(s).numel() for _, s in lay.values())}


def measure(what: str, path: str, ratio: float) -> dict:
    """One measurement, in this (fresh) process."""
    from lmeval_regions.artefacts import LazyScores
    from lmeval_regions.regions import select_file

    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t = time.perf_counter()
    out: dict = {}
    if what == "read_raw":  # plain sequential read of the file's bytes
        buf = bytearray(64 << 20)
        n = 0
        with open(path, "rb", buffering=0) as f:
            while (m := f.readinto(buf)):
                n += m
        out["bytes"] = n
    elif what == "read_tensors":  # every tensor once through LazyScores
        scores = LazyScores(path)
        out["checksum"] = sum(float(scores[n].view(-1)[::2048].float().sum())
                              for n in scores)  # touch the data
    else:
        region = select_file(path, "top", ratio, scope=what)
        out["selected"] = region.numel()
        out["per_matrix_min"] = min(region.counts().values())
    out["seconds"] = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = ru.ru_utime + ru.ru_stime - cpu0  # less sensitive to a busy machine
    out["peak_rss_mb"] = ru.ru_maxrss / 1024
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_load(max_load: float | None, timeout: float = 3600) -> float:
    """Wait until the 1-minute load average is at most ``max_load``; returns it."""
    t = time.monotonic()
    while max_load is not None and loadavg() > max_load and time.monotonic() - t < timeout:
        time.sleep(20)
    return loadavg()


# Runs the CLI and, at exit, reports the process' own peak RSS: VmHWM of /proc/self/status (this
# process' memory since exec). ru_maxrss from wait4 is not enough: Linux keeps the larger of the
# parent's RSS at fork time and the child's, so a child of a big process (pytest holding a model)
# would report the parent's size.
_PEAK_WRAPPER = """
import atexit, runpy, sys
def _report():
    with open('/proc/self/status') as f:
        kb = [l.split()[1] for l in f if l.startswith('VmHWM:')]
    sys.stderr.write('\\nLMEVAL_REGIONS_VMHWM_KB %s\\n' % (kb[0] if kb else -1))
atexit.register(_report)
sys.argv = ['lmeval-regions', *sys.argv[1:]]
runpy.run_module('lmeval_regions.cli', run_name='__main__', alter_sys=True)
"""


def cli_peak(args: list[str], cwd: str | os.PathLike | None = None,
             env: dict[str, str] | None = None) -> dict:
    """``lmeval-regions ARGS`` in a fresh process: ``{"seconds", "cpu_seconds",
    "peak_rss_bytes", "returncode", "output"}``; the peak is the process' own (VmHWM)."""
    log = Path(tempfile.mkstemp(prefix="lmeval_cli_", suffix=".log")[1])
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, *args], cwd=cwd, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    text = log.read_text()
    log.unlink()
    kb = [int(line.split()[1]) for line in text.splitlines()
          if line.startswith("LMEVAL_REGIONS_VMHWM_KB")]
    peak = kb[-1] * 1024 if kb and kb[-1] >= 0 else ru.ru_maxrss * 1024  # non-Linux: maxrss
    return {"seconds": seconds, "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": peak,
            "returncode": os.waitstatus_to_exitcode(status), "output": text}


def run_cli(scope: str | None, path: Path, ratio: float, keep: bool = False,
            method: str = "top") -> dict:
    """``lmeval-regions extract`` (``scope`` None: ``extract --help``, the start-up alone) in a
    fresh process: wall time and that process' own peak RSS (:func:`cli_peak`). ``keep``: keep
    the region file (its path is ``report["region"]``)."""
    out = path.with_name(f"region_{scope}_{method}.safetensors")
    args = ["extract"] + (["--help"] if scope is None else [
        "--importance", str(path), "--method", method, "--ratio", str(ratio), "--scope", scope,
        "--out", str(out), "--quiet", "--overwrite"])
    run = cli_peak(args)
    if run["returncode"]:
        raise SystemExit(f"lmeval-regions {' '.join(args)} failed:\n{run['output'][-3000:]}")
    report = {"command": "lmeval-regions " + " ".join(args), "seconds": run["seconds"],
              "cpu_seconds": run["cpu_seconds"], "peak_rss_mb": run["peak_rss_bytes"] / 2**20,
              "load_after": loadavg()}
    if scope is not None:
        from lmeval_regions.artefacts import read_metadata

        report["selected"] = read_metadata(out, "region")["numel"]
        out.with_name(out.stem + ".config.yaml").unlink(missing_ok=True)
        if keep:
            report["region"] = str(out)
        else:
            out.unlink()
    return report


def run_child(what: str, path: Path, ratio: float) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", what, "--file", str(path),
                        "--ratio", str(ratio)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"measurement '{what}' failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaMA-2-7B)")
    ap.add_argument("--ratio", type=float, default=0.03)
    ap.add_argument("--dir", default="/tmp/lmeval_bench", help="where the artefact is written")
    ap.add_argument("--out", default=None, help="JSON report path")
    ap.add_argument("--keep", action="store_true", help="keep the artefact")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the artefact already in --dir (kept by an earlier --keep "
                         "run) instead of writing it again")
    ap.add_argument("--rss-limit-mb", type=float, default=2048)
    ap.add_argument("--only", nargs="+", choices=["matrix", "global"], default=["matrix", "global"],
                    help="which selections to measure")
    ap.add_argument("--cli", action="store_true",
                    help="also run each selection as `lmeval-regions extract` (peak RSS)")
    ap.add_argument("--methods", default="top",
                    help="methods run from the CLI, comma-separated (top,bottom,middle,random)")
    ap.add_argument("--max-load", type=float, default=None,
                    help="wait until the 1-minute load average is at most this before the "
                         "file is written and before each case")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.file, args.ratio)))
        return

    from lmeval_regions.artefacts import write_text_atomic

    path = Path(args.dir) / f"importance_llama2_7b_L{args.layers}.safetensors"
    report: dict = {"shape": "LLaMA-2-7B block weights", "layers": args.layers,
                    "ratio": args.ratio, "rss_limit_mb": args.rss_limit_mb,
                    "threads": torch.get_num_threads(), "file": str(path),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        report["load_before"] = wait_for_load(args.max_load)
        if args.reuse and path.exists():
            report["generate"] = {"reused": True, "bytes": path.stat().st_size,
                                  "entries": sum(torch.Size(s).numel()
                                                 for _, s in layout(args.layers).values())}
        else:
            report["generate"] = generate(path, args.layers)
        print("generated", report["generate"], flush=True)
        # The first read warms the page cache as far as memory allows; later ones are comparable.
        for what in ("read_raw", "read_raw", "read_tensors", *args.only):
            key = what if what not in report else what + "_warm"
            if what == "read_raw" and "read_raw" in report:
                report["read_raw_cold"] = report.pop("read_raw")
                key = "read_raw"
            report[key] = run_child(what, path, args.ratio)
            print(key, report[key], flush=True)
        if args.cli:
            methods = args.methods.split(",")
            for scope in (None, *args.only):
                for method in (methods if scope else ["top"]):
                    key = f"cli_{scope}_{method}" if scope else "cli_startup"
                    load = wait_for_load(args.max_load)
                    report[key] = {"load_before": load,
                                   **run_cli(scope, path, args.ratio, method=method)}
                    print(key, report[key], flush=True)
            report["read_raw_after"] = run_child("read_raw", path, args.ratio)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    # The base: the fastest warm read of the file (before the cases, and after them with
    # --cli). A slower "warm" read was not all in the page cache yet (measured 5.5 s right after
    # writing the 13 GB file, 1.8 s after the cases): the fastest gives the strictest ratio.
    reads = [report["read_raw"], *([report["read_raw_after"]] if "read_raw_after" in report
                                   else [])]
    base = min(r["seconds"] for r in reads)
    report["read_base_seconds"] = base
    report["time_vs_sequential_read"] = {w: report[w]["seconds"] / base
                                         for w in ("read_tensors", *args.only)}
    cpu_base = max(min(r["cpu_seconds"] for r in reads), 1e-9)
    report["cpu_time_vs_sequential_read"] = {w: report[w]["cpu_seconds"] / cpu_base
                                             for w in ("read_tensors", *args.only)}
    report["ns_per_entry"] = {w: report[w]["seconds"] / report["generate"]["entries"] * 1e9
                              for w in ("read_raw", *args.only)}
    report["peak_rss_ok"] = all(report[w]["peak_rss_mb"] <= args.rss_limit_mb for w in args.only)
    if args.cli:
        cases = [k for k in report if k.startswith("cli_") and k != "cli_startup"
                 and isinstance(report[k], dict) and "seconds" in report[k]]
        report["cli_time_vs_sequential_read"] = {
            k[4:]: report[k]["seconds"] / base for k in cases}
        report["cli_peak_rss_mb"] = {k[4:]: report[k]["peak_rss_mb"] for k in cases}
        report["peak_rss_ok"] = report["peak_rss_ok"] and all(
            report[k]["peak_rss_mb"] <= args.rss_limit_mb for k in cases)
    report["load_after"] = loadavg()
    out = Path(args.out or Path(__file__).parent / "results" /
               ("bench_select.json" if args.layers == 32 else f"bench_select_L{args.layers}.json"))
    write_text_atomic(out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
