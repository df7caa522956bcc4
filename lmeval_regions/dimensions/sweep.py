"""Single-dimension and single-parameter perturbation (paper 1 §3.3, Fig. 3/4, Table 8).

* :func:`dimension_sweep`: for each candidate hidden dimension ``d``, re-initialise dimension
  ``d`` in every block (q/k/v/up/gate input column ``d``, o/down output row ``d``; draws from
  N(0, initializer_range²)) and evaluate (Fig. 3).
* :func:`norm_perturbation`: one norm weight, "reset 1" (effective scale 1: raw 1 for
  ``w``-scaled norms, raw 0 for Gemma's ``1 + w``) or "mul 10" (effective scale x10) (Table 8).
* :func:`generate` / :func:`generations`: greedy continuation of a prompt with and without a
  perturbation (Fig. 4).

All edits go through :class:`interventions.Editor` and are undone bit-exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lmeval_regions.dimensions.structured import hidden_dims_region
from lmeval_regions.errors import RegionsError
from lmeval_regions.interventions import Editor, Intervention
from lmeval_regions.models.module_map import ModuleMap, find_module_map
from lmeval_regions.regions import Region, from_specs

PERTURBATIONS = ("reset", "scale")


def dimension_sweep(model: nn.Module, dims: Iterable[int],
                    evaluate: Callable[[], Mapping[str, Any]],
                    intervention: Intervention | str = "reinit", seed: int = 0,
                    roles: Iterable[str] | None = None, mmap: ModuleMap | None = None,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Perturb each hidden dim across all layers in turn; rows ``{dim, perturbed, **evaluate()}``
    (plus a first row ``dim=None`` for the unperturbed model)."""
    mmap = mmap or find_module_map(model)
    iv = Intervention.parse(intervention) if isinstance(intervention, str) else intervention
    if iv.kind in ("noise", "reinit"):
        iv = Intervention(iv.kind, iv.value, seed)
    rows = [{"dim": None, "perturbed": 0, **evaluate()}]
    for d in dims:
        region = hidden_dims_region(model, [d], roles, mmap=mmap)
        with Editor(model) as ed:
            n = ed.apply(region, iv)
            rows.append({"dim": int(d), "perturbed": n, "intervention": str(iv), **evaluate()})
        if progress:
            progress(f"dim {d}: {rows[-1]}")
    return rows


def norm_perturbation(model: nn.Module, layer: int, dim: int, kind: str, factor: float = 10.0,
                      norm: str = "input", mmap: ModuleMap | None = None
                      ) -> tuple[Region, Intervention]:
    """The (region, intervention) that perturbs one norm weight.

    ``kind``: ``reset`` (effective scale 1, the initial value) or ``scale`` (effective scale
    times ``factor``). ``norm``: ``input`` (the block's first hidden-size norm) or a module name
    suffix such as ``post_attention_layernorm``.
    """
    if kind not in PERTURBATIONS:
        raise RegionsError(f"norm perturbation '{kind}' is not one of {PERTURBATIONS}")
    mmap = mmap or find_module_map(model)
    if not 0 <= layer < len(mmap.blocks):
        raise RegionsError(f"layer {layer} is outside [0, {len(mmap.blocks)})")
    nm = mmap.norm(layer, norm)
    if not 0 <= dim < nm.size:
        raise RegionsError(f"dim {dim} is outside [0, {nm.size}) of '{nm.name}'")
    w = float(dict(model.named_parameters())[nm.name].detach()[dim])
    target = 1.0 if kind == "reset" else nm.effective(w) * factor
    region = from_specs(model, f"{nm.name}[{dim}]")
    return region, Intervention("constant", float(nm.raw(target)))


def perturbation_table(model: nn.Module, dims: Iterable[int],
                       evaluate: Callable[[], Mapping[str, Any]],
                       layer: int = 1, norm: str = "input", factor: float = 10.0,
                       mmap: ModuleMap | None = None) -> list[dict[str, Any]]:
    """Table 8: base row, then reset-1 and x``factor`` of ``norm`` weight ``dim`` in ``layer``."""
    mmap = mmap or find_module_map(model)
    rows = [{"perturbation": "-", "parameter": "-", **evaluate()}]
    for kind in PERTURBATIONS:
        for d in dims:
            region, iv = norm_perturbation(model, layer, d, kind, factor, norm, mmap)
            with Editor(model) as ed:
                ed.apply(region, iv)
                label = "reset 1" if kind == "reset" else f"mul {factor:g}"
                rows.append({"perturbation": label, "parameter": f"L{layer}-N{d}",
                             "name": next(iter(region.indices)), "value": iv.value, **evaluate()})
    return rows


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generations(model: nn.Module, tokenizer, prompt: str,
                edits: Mapping[str, list[tuple[Region, Intervention | str]]],
                max_new_tokens: int = 20) -> dict[str, str]:
    """Fig. 4: ``{label: greedy continuation}`` for the unedited model (``"base"``) and under
    each labelled list of edits."""
    out = {"base": generate(model, tokenizer, prompt, max_new_tokens)}
    for label, ed_list in edits.items():
        with Editor(model) as ed:
            for region, iv in ed_list:
                ed.apply(region, iv)
            out[label] = generate(model, tokenizer, prompt, max_new_tokens)
    return out
