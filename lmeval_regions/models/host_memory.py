"""Keeping freed host memory in the process, for CPU runs.

A forward pass on the CPU allocates its activations afresh every batch, and lm-eval's
log-likelihoods hold a ``[batch, tokens, vocabulary]`` logits tensor and its log-softmax: at
Gemma-3's 262k vocabulary, batch 4 x 400 tokens, 1.7 GB each. glibc's malloc serves blocks that
large with ``mmap`` and gives them back with ``munmap`` when freed, so every batch faults all of
it in again, page by page; on virtual machines a fault costs microseconds (measured on the
2-core test VM: ~0.9 M faults and 1.5-3 s of kernel time per such forward of a 4.8-s batch;
none once the memory is kept). :func:`keep_freed_memory` makes malloc keep freed blocks for
reuse instead (``mallopt``: no ``mmap`` for large blocks, no trimming of the heap), which
changes no number, only where the memory comes from; the cost is that the process' resident
memory stays at its peak instead of falling between batches.

It is applied by the ``hf-regions`` lm-eval model when it runs on the CPU (model_arg
``keep_host_memory``, default true; :class:`~lmeval_regions.models.ModelConfig`'s
``--keep-host-memory`` for demo, table and eval), so also to the demo's importance pass, which
runs on that model. Commands that do not evaluate keep glibc's defaults: on a freed block whose
neighbours are in use, torch's 64-byte-aligned requests do not fit again, so kept memory
fragments (the demo's peak resident memory 5.6 -> 8.2 GB), and their peak memory is a
documented bound (docs/scale.md). GPU runs allocate their activations in torch's CUDA caching
allocator, which already keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees for its own reuse: no ``mmap``
    for large blocks (``M_MMAP_MAX`` 0) and no trimming of the heap (``M_TRIM_THRESHOLD`` -1,
    "disables trimming completely"). Process-wide and lasting; idempotent. Returns whether it
    is in effect (False off Linux/glibc: the C library's defaults stay)."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    _kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _kept
