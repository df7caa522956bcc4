"""Published neuron sets: the LAPE release's per-model neuron files as a :class:`NeuronSet`.

The LAPE release (Tang et al., 2024; RUCAIBox/Language-Specific-Neurons) publishes, per model,
a ``*.neuron.pth`` written by ``torch.save``: a ``List[List[LongTensor]]`` where
``neuron[i][j]`` holds the indices of language ``i``'s neurons in layer ``j`` (its README
gives the language order ``en, zh, fr, es, vi, id, ja``,
:data:`~lmeval_regions.paper.LAPE_RELEASE_LANGS`). The file carries no language names, so
the caller names them, in the file's order.

The file is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers and refuses any other pickled object; the structure is then checked (lists of
lists of 1-D integer tensors) and against the model: one list per layer, every index below
the intermediate size. Indices are channels of the MLP activation act(gate) (act(fc) for
BLOOM/OPT); zeroing channel k there is zeroing channel k of the down projection's input, where
:meth:`NeuronSet.intervene` applies sets, so ``zero`` and ``scale:X`` act exactly as the
release's deactivation (``mean`` needs stored means, which a published file does not have).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from lmeval_regions.activations import ACT_SITE
from lmeval_regions.artefacts import file_digest, model_fingerprint
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.models.architecture import find_layout
from lmeval_regions.neurons.sets import NeuronSet
from lmeval_regions.parsing import csv_list

METHOD = "lape-release"


def read_lape_file(path: str | os.PathLike) -> list[list[torch.Tensor]]:
    """``language -> layer -> (k,) int64`` neuron indices from a LAPE release file, read
    without unpickling arbitrary objects; anything but lists of lists of 1-D integer tensors
    is an :class:`ArtefactError`."""
    if not os.path.isfile(path):
        raise ArtefactError(f"LAPE neuron file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden objects, others for corrupt files
        raise ArtefactError(f"'{path}' is not a LAPE neuron file that can be read safely "
                            f"(expected torch.save of List[List[LongTensor]]): {e}") from e
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ArtefactError(f"'{path}' holds a {type(obj).__name__}, expected a non-empty list "
                            f"(one entry per language) of lists of LongTensors")
    out = []
    for i, per_layer in enumerate(obj):
        if not isinstance(per_layer, (list, tuple)):
            raise ArtefactError(f"'{path}': language {i} holds a {type(per_layer).__name__}, "
                                f"expected a list (one LongTensor per layer)")
        layers = []
        for j, idx in enumerate(per_layer):
            if (not isinstance(idx, torch.Tensor) or idx.dim() != 1
                    or idx.dtype.is_floating_point or idx.dtype.is_complex
                    or idx.dtype == torch.bool):
                what = (f"a {idx.dtype} tensor of shape {tuple(idx.shape)}"
                        if isinstance(idx, torch.Tensor) else f"a {type(idx).__name__}")
                raise ArtefactError(f"'{path}': language {i}, layer {j} holds {what}, expected "
                                    f"a 1-D integer tensor of neuron indices")
            layers.append(idx.to(torch.int64))
        out.append(layers)
    return out


def import_lape(path: str | os.PathLike, model: nn.Module,
                languages: str | Sequence[str]) -> NeuronSet:
    """A LAPE release neuron file as a :class:`NeuronSet` over ``model``.

    Args:
        path: the ``*.neuron.pth`` file.
        model: the model it was made for (checked: number of layers, intermediate size).
        languages: the set names, one per language in the file's order (a list, or a comma
            list such as ``"en,zh,fr,es,vi,id,ja"``).

    Returns one set per language (method ``lape-release``, ``selected_at`` the MLP
    activation's output), to save and deactivate like any other, e.g. through ``hf-regions``
    ``neurons=...,neuron_set=zh``.
    """
    names = csv_list(languages, what="languages") if isinstance(languages, str) \
        else [str(l).strip() for l in languages]
    if len(set(names)) != len(names) or not all(names):
        raise RegionsError(f"languages {names} must be distinct, non-empty names")
    data = read_lape_file(path)
    if len(names) != len(data):
        raise RegionsError(f"'{path}' holds {len(data)} languages but {len(names)} names were "
                           f"given ({', '.join(names)}); give one name per language, in the "
                           f"file's order")
    layout = find_layout(model)
    inter = layout.intermediate_size
    indices: dict[str, dict[str, torch.Tensor]] = {}
    for name, per_layer in zip(names, data):
        if len(per_layer) != layout.num_layers:
            raise ArtefactError(f"'{path}': language '{name}' has {len(per_layer)} layers, the "
                                f"model has {layout.num_layers} (a file for another model?)")
        indices[name] = {}
        for layer, idx in enumerate(per_layer):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= inter):
                bad = int(idx.max()) if int(idx.max()) >= inter else int(idx.min())
                raise ArtefactError(f"'{path}': language '{name}', layer {layer} has neuron "
                                    f"{bad}, outside the model's {inter} neurons per layer "
                                    f"(a file for another model?)")
            if idx.numel():
                indices[name][layout.down_proj[layer]] = idx
    info = {"source": os.path.basename(os.fspath(path)), "sha256": file_digest(path),
            "languages": names, "format": "LAPE release List[List[LongTensor]]"}
    try:
        return NeuronSet(indices, {}, model_fingerprint(model), METHOD, None, inter, info,
                         {n: ACT_SITE for n in names})
    except RegionsError as e:
        raise ArtefactError(f"'{path}' is not a valid neuron file: {e}") from e
