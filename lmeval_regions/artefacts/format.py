"""Artefacts: ``.safetensors`` files with JSON metadata, written atomically.

Every artefact (importance scores, regions, activations, neuron sets) is one safetensors file
whose tensors are keyed by name (parameter names, never list positions) and whose header
metadata holds one JSON document under the key ``lmeval_regions``::

    {"kind": "importance", "library_version": "0.1.0",
     "model": {"params": {name: shape, ...}, "sha256": "..."}, ...kind-specific fields}

The model fingerprint lists every parameter of the model the artefact was made from, so a file
applied to another model fails with the first mismatching parameter named.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmeval_regions import __version__
from lmeval_regions.artefacts.atomic import atomic_path
from lmeval_regions.errors import ArtefactError, ModelMismatchError

METADATA_KEY = "lmeval_regions"


def model_fingerprint(model: torch.nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """Names and shapes of every parameter, with a digest.

    ``model`` is a module, or a mapping ``name -> tensor or shape``. Tied parameters appear
    once, under their first name (as ``named_parameters`` yields them).
    """
    if isinstance(model, torch.nn.Module):
        items = {n: list(p.shape) for n, p in model.named_parameters()}
    else:
        items = {n: list(getattr(v, "shape", v)) for n, v in model.items()}
    digest = hashlib.sha256(json.dumps(sorted(items.items())).encode()).hexdigest()
    return {"params": items, "sha256": digest}


def check_fingerprint(
    expected: Mapping[str, Any], model: torch.nn.Module, what: str = "artefact", names=None
) -> None:
    """Raise :class:`ModelMismatchError` naming the first parameter that differs.

    Only the parameters in ``names`` (default: all of ``expected``) must match, so a region over
    block matrices applies to a model whose embeddings were resized, say.
    """
    have = {n: list(p.shape) for n, p in model.named_parameters()}
    want = expected["params"]
    # "First" in the loaded model's parameter order (files store names sorted, so layer 10
    # would otherwise come before layer 2); names the model lacks come after.
    order = {n: i for i, n in enumerate(have)}
    names = list(names if names is not None else want)
    names.sort(key=lambda n: order.get(n, len(order)))
    for name in names:
        if name not in want:
            raise ModelMismatchError(f"{what} holds '{name}', which its own fingerprint lacks")
        if name not in have:
            raise ModelMismatchError(
                f"{what} was made for another model: its parameter '{name}' "
                f"(shape {want[name]}) does not exist in the loaded model "
                f"({len(have)} parameters, e.g. {next(iter(have), None)!r})"
            )
        if have[name] != list(want[name]):
            raise ModelMismatchError(
                f"{what} was made for another model: parameter '{name}' has shape "
                f"{want[name]} in the file but {have[name]} in the loaded model"
            )


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in name.replace(".", " ").split()]


def check_same_model(paths: Iterable[str | os.PathLike], kind: str | None = None
                     ) -> dict[str, Any]:
    """Check that artefacts were made for one model (from their metadata alone: nothing else
    is read); returns the first one's fingerprint. A mismatch names both files and the first
    parameter (in layer order) that differs."""
    paths = [Path(p) for p in paths]
    docs = [(p, read_metadata(p, kind)) for p in paths]
    base_path, base = docs[0][0], docs[0][1].get("model") or {}
    for p, doc in docs[1:]:
        other = doc.get("model") or {}
        if not base or not other or other.get("sha256") == base.get("sha256"):
            continue  # ad-hoc regions carry no fingerprint
        a, b = base["params"], other["params"]
        for name in sorted(set(a) | set(b), key=_natural):
            if a.get(name) != b.get(name):
                raise ModelMismatchError(
                    f"'{base_path}' and '{p}' were made for different models: parameter "
                    f"'{name}' has shape {a.get(name, 'absent')} in the first and "
                    f"{b.get(name, 'absent')} in the second")
    return base


def save_artefact(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    meta: Mapping[str, Any],
) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) as one safetensors file, atomically."""
    doc = {"kind": kind, "library_version": __version__, **meta}
    header = {METADATA_KEY: json.dumps(doc, sort_keys=True)}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)
    return path


def read_metadata(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The JSON metadata of an artefact, checked to be of ``kind`` (if given)."""
    path = Path(path)
    if not path.exists():
        raise ArtefactError(f"artefact file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ArtefactError(
            f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if raw is None:
        raise ArtefactError(
            f"'{path}' is a safetensors file but not an lmeval-regions artefact "
            f"(no '{METADATA_KEY}' metadata)"
        )
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtefactError(f"'{path}' has corrupt metadata: {e}") from e
    if kind is not None and doc.get("kind") != kind:
        got = str(doc.get("kind"))
        got = got if len(got) <= 60 else got[:60] + "..."  # a corrupt file: show a little
        raise ArtefactError(f"'{path}' holds a '{got}' artefact, expected '{kind}'")
    return doc


def load_artefact(
    path: str | os.PathLike, kind: str | None = None, names=None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artefact: ``(tensors, metadata)``. ``names`` limits which tensors are read."""
    doc = read_metadata(path, kind)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys() if names is None else names:
                tensors[key] = f.get_tensor(key)
    except ArtefactError:
        raise
    except Exception as e:
        raise ArtefactError(f"'{path}' could not be read (truncated or corrupt?): {e}") from e
    return tensors, doc


def iter_tensors(path: str | os.PathLike):
    """Yield ``(name, tensor)`` one at a time from a memory-mapped artefact (bounded memory)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except Exception as e:
        raise ArtefactError(f"'{path}' could not be read (truncated or corrupt?): {e}") from e


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file (source fingerprints of corpora)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
