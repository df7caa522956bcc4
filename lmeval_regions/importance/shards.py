"""Importance artefacts written per shard (FSDP2) and merged into one.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, also through accelerate) each parameter is
a DTensor sharded on dim 0 and :func:`importance.compute_importance` accumulates this rank's
rows only. Each rank then writes its rows with their offsets (:func:`save_shard`); any one
process merges the files (:func:`merge_shards`), one tensor in memory at a time::

    imp = compute_importance(fsdp_model, my_batches)         # every rank, its own data
    save_shard(imp, fsdp_model, "imp.safetensors")           # -> imp.rank000-of-002.safetensors
    merge_shards(shard_paths("imp.safetensors", 2), "imp.safetensors")   # one process

Shard metadata: the importance metadata of that rank plus ``shard = {rank, world_size,
rows: {name: [start, stop]}, shapes: {name: global shape}}``. The merged artefact is an ordinary
importance artefact; ``n_sequences`` and ``n_tokens`` are summed over ranks (data parallel: each
rank counts what it processed), ``n_skipped`` is taken from rank 0 (the skip decision is made
jointly, so every rank skips the same batches).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from safetensors import safe_open
from torch import nn

from lmeval_regions.artefacts import read_metadata, save_artefact, torch_dtype, write_safetensors
from lmeval_regions.errors import ArtefactError, RegionsError
from lmeval_regions.importance.artefact import KIND, Importance, criterion_of
from lmeval_regions.models.sharding import is_sharded, local_rows, rank_world


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """``imp.safetensors`` -> ``imp.rank001-of-004.safetensors``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank:03d}-of-{world_size:03d}{p.suffix or '.safetensors'}")


def shard_paths(path: str | os.PathLike, world_size: int) -> list[Path]:
    return [shard_path(path, r, world_size) for r in range(world_size)]


def save_shard(importance: Importance, model: nn.Module, path: str | os.PathLike,
               rank: int | None = None, world_size: int | None = None) -> Path:
    """Write this rank's rows of ``importance`` (computed on the sharded ``model``).

    Returns the shard's path, :func:`shard_path` of ``path``. Replicated tensors are written by
    rank 0 only (other ranks store 0 rows).
    """
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    params = dict(model.named_parameters())
    tensors, rows, shapes = {}, {}, {}
    for name, score in importance.scores.items():
        if name not in params:
            raise RegionsError(f"importance has scores for '{name}', which the model lacks")
        p = params[name]
        if is_sharded(p):
            start, stop = local_rows(p)
            local = score
        else:  # replicated: written once, by rank 0
            start, stop = (0, p.shape[0]) if rank == 0 else (0, 0)
            local = score[start:stop]
        if list(local.shape[1:]) != list(p.shape[1:]) or local.shape[0] != stop - start:
            raise RegionsError(f"scores of '{name}' have shape {list(score.shape)}, not this "
                               f"rank's rows {start}:{stop} of {list(p.shape)}")
        tensors[name], rows[name], shapes[name] = local, [start, stop], list(p.shape)
    meta = importance.meta()
    meta["shard"] = {"rank": rank, "world_size": world_size, "rows": rows, "shapes": shapes}
    out = shard_path(path, rank, world_size)
    save_artefact(out, tensors, KIND, meta)
    return out


def merge_shards(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge the per-rank files of one run into one importance artefact at ``out``.

    Checks that the files are all ranks of one run (same model, criterion, world size, names) and
    that their rows tile every tensor exactly; the output is written tensor by tensor.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise RegionsError("merge_shards() needs at least one shard file")
    docs = [read_metadata(p, KIND) for p in paths]
    for p, d in zip(paths, docs):
        if "shard" not in d:
            raise ArtefactError(f"'{p}' is an importance artefact but not a shard (no 'shard' "
                                "metadata); it needs no merging")
    world = docs[0]["shard"]["world_size"]
    ranks = sorted(d["shard"]["rank"] for d in docs)
    if ranks != list(range(world)):
        raise ArtefactError(f"shards of a {world}-rank run must be ranks 0..{world - 1} once "
                            f"each; got ranks {ranks} from {[str(p) for p in paths]}")
    first = docs[0]
    for p, d in zip(paths, docs):
        if criterion_of(d, p) != criterion_of(first, paths[0]) or d["model"] != first["model"]:
            raise ArtefactError(f"'{p}' differs from '{paths[0]}' in criterion or model: not "
                                "one run")
        if d["shard"]["world_size"] != world or d["shard"]["shapes"] != first["shard"]["shapes"]:
            raise ArtefactError(f"'{p}' differs from '{paths[0]}' in world size or tensor set")
    by_rank = sorted(zip(paths, docs), key=lambda pd: pd[1]["shard"]["rank"])
    shapes = first["shard"]["shapes"]
    dtypes = {}
    with safe_open(str(by_rank[0][0]), framework="pt") as f:
        for n in shapes:
            dtypes[n] = f.get_slice(n).get_dtype()
    for n, shape in shapes.items():
        cursor = 0
        for p, d in by_rank:
            start, stop = d["shard"]["rows"][n]
            if stop == start:
                continue
            if start != cursor:
                raise ArtefactError(f"shard rows of '{n}' do not tile its {shape[0]} rows: "
                                    f"'{p}' starts at {start}, expected {cursor}")
            cursor = stop
        if cursor != shape[0]:
            raise ArtefactError(f"shard rows of '{n}' cover {cursor} of its {shape[0]} rows")

    def pieces(name):
        for p, d in by_rank:
            start, stop = d["shard"]["rows"][name]
            if stop > start:
                with safe_open(str(p), framework="pt") as f:
                    yield f.get_tensor(name).clone()  # own the memory before the file closes

    layout = {n: (torch_dtype(dtypes[n]), shapes[n]) for n in shapes}
    meta = {k: v for k, v in first.items() if k not in ("kind", "library_version", "shard")}
    meta["n_sequences"] = sum(d.get("n_sequences", 0) for d in docs)
    meta["n_tokens"] = sum(d.get("n_tokens", 0) for d in docs)
    meta["merged_from_shards"] = world
    return write_safetensors(out, layout, pieces, meta, kind=KIND)
