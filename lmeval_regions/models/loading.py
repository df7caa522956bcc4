"""Loading a model and its tokenizer from one :class:`ModelConfig`.

Every command that loads a model takes the same flags, generated from :class:`ModelConfig`
(``--model --device --dtype --device-map --revision --trust-remote-code
--keep-host-memory``); lm-eval runs get the same settings as ``hf`` model_args through
:meth:`ModelConfig.hf_model_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.models.embedded import DEFAULT_MODEL, EMBEDDED, resolve_pretrained
from lmeval_regions.models.parallel import launched_device

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which model to load, in which dtype, on which device(s)."""

    model: str = DEFAULT_MODEL
    """Embedded model (gemma-3-270m: Gemma-3-270M base, smollm2-135m: SmolLM2-135M-Instruct;
    both 4-bit GGUF quantisations from PyPI, de-quantised to fp32: `lmeval-regions model-path
    NAME` says exactly what), a local HF folder, or a hub id."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu). Not used
    with device_map."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights; bfloat16 on GPUs. Importance accumulates in fp32 (or in bf16 with
    stochastic rounding) whatever this is."""
    device_map: str | None = None
    """accelerate device map for a model larger than one GPU (e.g. auto: layers spread over
    the visible GPUs, then CPU); empty: the whole model on --device."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub model; checkpoints of one training run."""
    trust_remote_code: bool = False
    """Run model code shipped in the model's repository (transformers' flag of that name)."""
    keep_host_memory: bool = True
    """Evaluation through lm-eval on the CPU (demo, table, eval; hf-regions' model_arg of that
    name): keep memory the process frees for reuse (glibc malloc: no mmap for large blocks,
    no trimming) instead of faulting every batch's logits in afresh -- the same numbers, ~1/3
    less time on the 2-core VM, resident memory held near its peak (models/host_memory.py).
    Commands that do not evaluate (importance, activations, ...) keep glibc's defaults."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise RegionsError(f"model {self.model!r} is empty: give an embedded name "
                               f"({', '.join(sorted(EMBEDDED))}), a local folder or a hub id")
        if self.dtype not in DTYPES:
            raise RegionsError(f"dtype '{self.dtype}' is not one of {DTYPES}."
                               + did_you_mean(str(self.dtype), DTYPES))
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise RegionsError(f"device '{self.device}' is not a torch device; expected "
                                   "cpu, cuda, cuda:N, mps or auto") from None
        if self.device_map == "":
            self.device_map = None

    def resolved_device(self) -> str:
        """The device to use: ``auto`` becomes cuda when available, else cpu; a CUDA device on
        a machine without one is an error naming it. Under a launcher of several processes
        (``accelerate launch``, ``torchrun``) ``cuda`` is each process' own GPU,
        ``cuda:LOCAL_RANK``."""
        import torch

        if self.device == "auto":
            return launched_device("cuda") if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RegionsError(f"device '{self.device}' was asked for, but torch sees no CUDA "
                               "device here; use --device cpu (or auto)")
        return launched_device(self.device)

    def path(self) -> str:
        """Local folder of an embedded model (converted once), else ``model`` unchanged."""
        return resolve_pretrained(self.model)

    def hf_model_args(self) -> dict[str, Any]:
        """The same settings as lm-eval ``hf`` model_args."""
        args: dict[str, Any] = {"pretrained": self.path(), "dtype": self.dtype,
                                "trust_remote_code": self.trust_remote_code}
        if self.device_map:
            args.update(parallelize=True, device_map=self.device_map)
        else:
            args["device"] = self.resolved_device()
        if self.revision:
            args["revision"] = self.revision
        if not self.keep_host_memory:
            args["keep_host_memory"] = False  # hf-regions' key (its default: true)
        if self.dtype != "float32":
            # lm-eval's hf takes log-softmax and sums each document's log-likelihood in the
            # model's dtype by default: in bf16 a 256-token document's sum is held to ~3
            # significant digits (a sum near 600 is a multiple of 4), so small edits vanish
            # (a Top-5% removal scored exactly as Base on a tiny model). Our perplexity is
            # computed in fp32 whatever the weights; this keeps lm-eval's the same.
            args["softmax_dtype"] = "float32"
        return args


def load_model(config: ModelConfig | str = DEFAULT_MODEL, **overrides: Any):
    """``(model, tokenizer)`` in eval mode, from a :class:`ModelConfig` or a model name (plus
    field overrides, e.g. ``load_model("gemma-3-270m", dtype="bfloat16")``). A name alone
    loads fp32 on the CPU, as before ``device="auto"`` existed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(config, str):
        config = ModelConfig(model=config, **{"device": "cpu", **overrides})
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    path = config.path()
    if not Path(path).exists() and "/" not in path:
        raise RegionsError(f"model '{config.model}' is neither an embedded model nor a local "
                           "folder." + did_you_mean(config.model, EMBEDDED)
                           + f" Embedded: {sorted(EMBEDDED)}")
    kw: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.revision:
        kw["revision"] = config.revision
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if config.device_map:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype),
                                                     device_map=config.device_map, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype),
                                                     **kw)
        # in place; transformers' decorated .to() confuses type checkers
        model.to(config.resolved_device())  # type: ignore[arg-type]
    model.eval()
    return model, tok


def meta_model(config: ModelConfig | str = DEFAULT_MODEL):
    """The model's module structure built from its config on the meta device: no weights are
    read or allocated (milliseconds), so a command can check an architecture
    (:func:`models.check_module_map`) before loading it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, str):
        config = ModelConfig(model=config, device="cpu")
    path = config.path()
    kw: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.revision:
        kw["revision"] = config.revision
    try:
        cfg = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise RegionsError(f"cannot read the config of model '{config.model}': {e}") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=config.trust_remote_code)
