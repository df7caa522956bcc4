"""Locate the parts of a causal LM by module structure, never by the model's name.

Works for any HF decoder whose blocks sit in one ``nn.ModuleList`` of length
``config.num_hidden_layers`` (Llama, Gemma/Gemma3, BLOOM, GPT-2, Qwen, Mistral, ...).
Inside a block, the MLP's *down projection* is the linear layer mapping the intermediate width
back to the hidden width; its input is the MLP neuron activation (act(gate)*up for gated MLPs,
act(fc) for plain ones).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lmeval_regions.errors import RegionsError, did_you_mean


def text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    # Multimodal wrappers keep the decoder's sizes in a text sub-config.
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def linear_shape(m: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 style Conv1D, else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2:
        return w.shape[0], w.shape[1]
    return None


@dataclass
class BlockLayout:
    """Where things are in one model: names relative to the model root.

    Attributes:
        blocks_path: dotted name of the ``ModuleList`` holding the decoder blocks.
        num_layers: number of blocks.
        hidden_size: residual-stream width.
        down_proj: for each block, the dotted name of the MLP down projection.
        intermediate_size: width of the MLP neuron layer (input of ``down_proj``).
    """

    blocks_path: str
    num_layers: int
    hidden_size: int
    down_proj: list[str] = field(default_factory=list)
    intermediate_size: int = 0

    def block(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def layer_of(self, name: str) -> int | None:
        """Index of the block a parameter/module name lives in, or None."""
        prefix = self.blocks_path + "."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def find_layout(model: nn.Module) -> BlockLayout:
    """Find the decoder blocks and each block's MLP down projection by structure."""
    cfg = text_config(model)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    lists = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)
    ]
    if not lists:
        raise RegionsError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList "
            f"of {n_layers} blocks"
        )
    # The decoder stack is the largest such list (vision towers etc. are separate and smaller).
    blocks_path, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    if hidden is None:
        raise RegionsError(f"cannot read the hidden size from {type(model).__name__}'s config")
    down, inter = [], 0
    for i, block in enumerate(blocks):
        cands = []
        for sub, m in block.named_modules():
            shape = linear_shape(m)
            if (shape and shape[1] == hidden and shape[0] > hidden and "attn" not in sub
                    and "attention" not in sub):
                cands.append((sub, shape[0]))
        if len(cands) != 1:
            raise RegionsError(
                f"block {blocks_path}.{i} has {len(cands)} candidate MLP down projections "
                f"(linear layers from a wider layer to hidden size {hidden}): {cands}"
            )
        down.append(f"{blocks_path}.{i}.{cands[0][0]}")
        inter = cands[0][1]
    return BlockLayout(blocks_path, len(blocks), hidden, down, inter)



@dataclass
class MlpActivations:
    """Where each block's MLP applies its activation function, found by structure.

    Attributes:
        modules: for each block, the dotted name of the MLP's activation-function module; its
            output is act(gate) in a gated MLP (Llama, Gemma, Qwen, Mistral) and act(fc) in a
            plain one (BLOOM, GPT-2), shape ``(..., intermediate)``.
        gated: whether that output is multiplied by an up projection before the down
            projection (then it differs from the down projection's input).
    """

    modules: list[str]
    gated: bool


def _is_attention(sub: str) -> bool:
    return "attn" in sub or "attention" in sub


def find_mlp_activations(model: nn.Module, layout: BlockLayout | None = None) -> MlpActivations:
    """Find each block's MLP activation module: the one parameter-free module (dropout and
    identity aside) inside the module holding the down projection, outside attention. The MLP
    is *gated* when, besides the down projection, it has two linear layers to the
    intermediate width (or one fused layer to twice that width).

    Raises :class:`RegionsError` when a block has no such module (an activation applied as a
    plain function) or several, or when one module object serves several blocks (hooks could
    not tell the layers apart).
    """
    layout = layout or find_layout(model)
    modules = dict(model.named_modules())
    names, seen, gated = [], {}, set()
    for i, down in enumerate(layout.down_proj):
        parent = down.rsplit(".", 1)[0]
        mlp = modules[parent]
        acts, widths = [], []
        for sub, m in mlp.named_modules():
            full = f"{parent}.{sub}" if sub else parent
            if not sub or full == down or _is_attention(sub):
                continue
            shape = linear_shape(m)
            if shape:
                if shape[0] == layout.hidden_size:
                    widths.append(shape[1])
                continue
            if (not list(m.children()) and not any(True for _ in m.parameters(recurse=False))
                    and not isinstance(m, (nn.Dropout, nn.Identity))):
                acts.append((full, m))
        if len(acts) != 1:
            raise RegionsError(
                f"block {layout.block(i)}: expected one activation-function module in "
                f"'{parent}', found {[a for a, _ in acts] or 'none'} (an activation applied as "
                f"a plain function cannot be hooked; read neurons at the down projection's "
                f"input instead)")
        name, act = acts[0]
        # named_modules() lists a shared module once, so a hook on it would fire per block
        if id(act) in seen:
            raise RegionsError(f"'{name}' is the same module object as '{seen[id(act)]}': one "
                               f"activation module serves several blocks, so hooks cannot "
                               f"tell the layers apart")
        seen[id(act)] = name
        inter = layout.intermediate_size
        gated.add(widths.count(inter) >= 2 or 2 * inter in widths)
        names.append(name)
    if len(gated) > 1:
        raise RegionsError("some MLPs of this model are gated and some are not; "
                           "expected one MLP structure in every block")
    return MlpActivations(names, gated.pop())

def block_parameters(
    model: nn.Module,
    include: list[str] | tuple[str, ...] | None = None,
    include_norms: bool = False,
    include_biases: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters a region may cover, by name.

    Default: every 2-D weight inside the decoder blocks (embeddings and lm_head excluded),
    plus 1-D weights inside blocks when ``include_norms`` (norm scales) and biases when
    ``include_biases``. ``include`` replaces the default by glob patterns over full
    parameter names (``fnmatch``; ``re:`` prefix for a regular expression); each pattern must
    match something, else the error lists close names.
    """
    named = dict(model.named_parameters())
    if include:
        chosen: dict[str, nn.Parameter] = {}
        for pat in include:
            if pat.startswith("re:"):
                rx = re.compile(pat[3:])
                hits = [n for n in named if rx.search(n)]
            else:
                hits = fnmatch.filter(named, pat)
            if not hits:
                raise RegionsError(
                    f"parameter pattern '{pat}' matches no parameter of {type(model).__name__}."
                    + did_you_mean(pat, named)
                )
            for n in hits:
                chosen[n] = named[n]
        return chosen
    layout = find_layout(model)
    out = {}
    for n, p in named.items():
        if layout.layer_of(n) is None:
            continue
        is_bias = n.endswith(".bias")
        if p.dim() == 2 and not is_bias:
            out[n] = p
        elif p.dim() == 1 and is_bias and include_biases:
            out[n] = p
        elif p.dim() == 1 and not is_bias and include_norms:
            out[n] = p
    return out


def matrix_kind(name: str) -> str:
    """Short module label of a parameter name for tables: 'self_attn.q_proj' etc."""
    parts = name.split(".")
    # drop "<blocks>.<i>." prefix and the trailing ".weight"/".bias"
    for j, part in enumerate(parts):
        if part.isdigit():
            parts = parts[j + 1:]
            break
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts)


def init_std(model: nn.Module) -> float:
    """The std the model's own initialiser uses for weights (``config.initializer_range``)."""
    cfg = text_config(model)
    std = getattr(cfg, "initializer_range", None)
    if std is None:
        raise RegionsError(
            f"{type(model).__name__}'s config has no initializer_range; pass an explicit std"
        )
    return float(std)


def named_param(model: nn.Module, name: str) -> torch.nn.Parameter:
    params = dict(model.named_parameters())
    if name not in params:
        raise RegionsError(f"model has no parameter '{name}'." + did_you_mean(name, params))
    return params[name]
