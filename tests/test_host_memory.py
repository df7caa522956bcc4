"""CPU runs keep the memory they free (models/host_memory.py): a block freed and allocated
again is not faulted in afresh, and the setting is applied only where it should be."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmeval_regions.errors import RegionsError
from lmeval_regions.models import ModelConfig

# A process that allocates and touches 256 MB and frees it, then does so 6 times more, and
# prints the memory still resident after the first free (MB above the start) and the page
# faults of the 6 rounds; argv[1] = "keep" applies keep_freed_memory first.
ROUNDS = r"""
import resource, sys
import torch  # (numpy backs large arrays with huge pages: few faults either way)
from lmeval_regions.models import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
start = resident_mb()
a = torch.ones(1 << 26); del a   # 256 MB, touched, freed
kept = resident_mb() - start
before = faults()
for _ in range(6):
    b = torch.ones(1 << 26); del b
print(kept, faults() - before)
"""


def _run(mode: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                         check=True)
    kept, faults = out.stdout.split()[-2:]
    return float(kept), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process_and_is_reused():
    pages = (1 << 28) // 4096  # one round: 65,536 pages of 4 KiB
    kept_default, faults_default = _run("default")
    kept, faults = _run("keep")
    # glibc's default unmaps a block that large when it is freed: every round faults it in
    assert kept_default < 64 and faults_default > 5.5 * pages
    # kept: still resident after the free, and rounds reuse it -- not every one: a freed
    # block whose neighbours were taken in between no longer fits torch's 64-byte-aligned
    # request of the same size (1-5 of the 6 rounds faulted in runs here)
    assert kept > 240 and faults < faults_default - pages // 2, (kept, faults, faults_default)


def test_the_lm_eval_model_keeps_memory_on_the_cpu_unless_told_not_to(tiny_lm_dir,
                                                                        monkeypatch):
    from lmeval_regions.eval.model import HFRegionsLM

    calls = []
    monkeypatch.setattr("lmeval_regions.eval.model.keep_freed_memory",
                        lambda: calls.append(1) or True)
    HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", batch_size=1)
    assert calls == [1]
    for off in (False, "false", "False"):  # lm-eval's CLI types the value, Python does not
        HFRegionsLM(pretrained=str(tiny_lm_dir), device="cpu", keep_host_memory=off)
    assert calls == [1]
    with pytest.raises(RegionsError, match="keep_host_memory 'maybe' is not true or false"):
        HFRegionsLM(pretrained=str(tiny_lm_dir), keep_host_memory="maybe")


def test_model_config_passes_the_setting_to_hf_regions():
    assert "keep_host_memory" not in ModelConfig(device="cpu").hf_model_args()  # its default
    off = ModelConfig(device="cpu", keep_host_memory=False).hf_model_args()
    assert off["keep_host_memory"] is False
