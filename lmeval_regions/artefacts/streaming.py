"""Bounded-memory artefact I/O: lazy reading and tensor-by-tensor writing of safetensors files.

:class:`LazyScores` is a read-only mapping ``name -> tensor`` over an artefact: a tensor is read
(a plain read of its bytes, located from the header) only when accessed, so
``regions.select(LazyScores(path), ...)`` holds one score tensor at a time -- per-matrix and
global scopes alike (global selection reads each tensor 2-3 times, see
:mod:`~lmeval_regions.regions.ranking`).

:func:`write_safetensors` writes a file tensor by tensor (header first, then each tensor's bytes
as it is produced), for artefacts too big to hold at once: merged FSDP shards, 7B-sized
benchmark inputs. The file is a standard safetensors file, written atomically.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

from lmeval_regions import __version__
from lmeval_regions.artefacts.atomic import atomic_path
from lmeval_regions.artefacts.format import METADATA_KEY, read_metadata
from lmeval_regions.errors import ArtefactError, RegionsError, did_you_mean

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.float64: "F64", torch.int32: "I32", torch.int64: "I64", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class LazyScores(Mapping[str, torch.Tensor]):
    """Read-only ``name -> tensor`` over a safetensors artefact, reading one tensor on access.

    Args:
        path: the artefact (``.safetensors``).
        kind: the artefact kind its metadata must declare (default ``importance``); None accepts
            any lmeval-regions artefact.

    Attributes:
        shapes: ``name -> shape`` (from the header; no tensor is read).
        dtypes: ``name -> torch dtype`` as stored.
        meta: the artefact's JSON metadata (``model`` fingerprint, ``mode``, ...).
        validate: ``validate(name, tensor)`` called the first time each tensor is read (it
            raises on bad values, e.g. :func:`importance.check_scores`); None: no check.
        progress: ``progress(name)`` called once per tensor, when its values have first been
            checked (a progress bar); None: nothing.

    Iteration order is the file's key order, the same as :func:`artefacts.load_artefact`'s.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = "importance",
                 validate: Callable[[str, torch.Tensor], None] | None = None):
        self.path = Path(path)
        self.meta = read_metadata(self.path, kind)
        self.validate = validate
        self.progress: Callable[[str], None] | None = None
        self._validated: set[str] = set()  # global selection reads a tensor 2-3 times
        self._transient: threading.local | None = None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._names = list(f.keys())
                self.shapes = {n: list(f.get_slice(n).get_shape()) for n in self._names}
                self.dtypes = {n: torch_dtype(f.get_slice(n).get_dtype()) for n in self._names}
            with open(self.path, "rb") as fh:  # byte offsets, for plain reads
                (n_header,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n_header))
            self._data_start = 8 + n_header
            self._offsets = {n: tuple(header[n]["data_offsets"]) for n in self._names}
        except Exception as e:
            raise ArtefactError(f"'{self.path}' could not be read (truncated or corrupt?): "
                                f"{e}") from e

    @contextmanager
    def transient_reads(self) -> Iterator["LazyScores"]:
        """Within this block each thread's reads share one buffer of that thread (grown to the
        largest tensor read): a tensor is valid until the same thread reads the next one. For
        a consumer that is done with each tensor before reading another (selection); it saves
        faulting in fresh memory for every tensor (4-5x the cost of the read itself here)."""
        self._transient = threading.local()
        try:
            yield self
        finally:
            self._transient = None

    def _memory(self, name: str) -> torch.Tensor:
        """Where tensor ``name`` is read into: its own memory, or the thread's buffer."""
        shape, dtype = self.shapes[name], self.dtypes[name]
        local = self._transient
        if local is None:
            return torch.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        buf = getattr(local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = local.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str, check: bool = True) -> torch.Tensor:
        """Tensor ``name``, its values checked by ``validate`` the first time it is read.
        ``check=False``: returned unchecked, for a caller whose own pass over the values can
        stand in for the check; it then calls :meth:`mark_checked` (see there)."""
        if name not in self.shapes:
            raise KeyError(name)
        # A plain read into memory this tensor owns: a memory-mapped tensor keeps file pages
        # resident (and counted in RSS) for as long as the mapping lives; at 7B scale these
        # added ~0.8 GB to a global selection's peak.
        start, stop = self._offsets[name]
        out = self._memory(name)
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None and buf.nbytes != stop - start:
            raise ArtefactError(f"'{self.path}': tensor '{name}' has {stop - start} bytes, "
                                f"expected {buf.nbytes} for shape {self.shapes[name]}")
        if buf is not None:
            self._read_into(name, start, buf)
        if check:
            self.mark_checked(name, out)
        return out

    def mark_checked(self, name: str, values: torch.Tensor | None = None) -> None:
        """Record that tensor ``name`` passed its check (once per name; ``progress`` is told).
        ``values``: run ``validate`` on them now (it raises on bad values). None: the
        caller's own pass found every value finite and >= +0.0 -- which a validator of
        importance scores (:func:`importance.check_scores`) accepts -- so no second pass over
        the values is made (at 7B scale that pass is ~2 s of a 9-s extraction)."""
        if name in self._validated:
            return
        if values is not None and self.validate is not None:
            self.validate(name, values)
        self._validated.add(name)
        if self.progress is not None:
            self.progress(name)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of tensor ``name`` in flat (C) order, read alone (a
        sample of a few blocks costs a few reads, not a pass over the file)."""
        if name not in self.shapes:
            raise KeyError(name)
        dtype = self.dtypes[name]
        size = torch.empty(0, dtype=dtype).element_size()
        n = math.prod(self.shapes[name])
        if not 0 <= start <= stop <= n:
            raise RegionsError(f"range [{start}, {stop}) is outside '{name}' ({n} entries)")
        out = torch.empty(stop - start, dtype=dtype)
        if out.numel():
            self._read_into(name, self._offsets[name][0] + start * size,
                            out.view(torch.uint8).numpy())
        return out

    def _read_into(self, name: str, offset: int, buf) -> None:
        """Fill ``buf`` with the file's bytes from data offset ``offset`` (plain reads)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + offset)
                view, got = memoryview(buf), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise ArtefactError(f"'{self.path}' is truncated inside '{name}'")
                    got += n
        except OSError as e:
            raise ArtefactError(f"'{self.path}': tensor '{name}' could not be read: {e}") from e

    def __contains__(self, name: object) -> bool:
        return name in self.shapes  # (Mapping's default would read the tensor to find out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def check(self, names: Iterable[str]) -> None:
        for n in names:
            if n not in self.shapes:
                raise RegionsError(f"'{self.path}' has no scores for '{n}'."
                                   + did_you_mean(n, self.shapes))


def torch_dtype(code: str) -> torch.dtype:
    for dt, c in DTYPES.items():
        if c == code:
            return dt
    raise ArtefactError(f"unsupported safetensors dtype '{code}'")


def write_safetensors(
    path: str | os.PathLike,
    layout: Mapping[str, tuple[torch.dtype, list[int]]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    meta: Mapping[str, Any] | None = None,
    kind: str | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, atomically.

    Args:
        layout: ``name -> (dtype, shape)`` in file order.
        produce: ``produce(name)`` returns the tensor, or an iterable of pieces (e.g. row blocks)
            whose concatenated bytes are the tensor in C order; only one piece is held at a time.
        meta: JSON metadata stored like :func:`artefacts.save_artefact` does (with ``kind``).
    """


    header: dict[str, Any] = {}
    if meta is not None or kind is not None:
        doc = {"kind": kind, "library_version": __version__, **(meta or {})}
        header["__metadata__"] = {METADATA_KEY: json.dumps(doc, sort_keys=True)}
    offset = 0
    for name, (dtype, shape) in layout.items():
        if dtype not in DTYPES:
            raise RegionsError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, shape) in layout.items():
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            got = 0
            out = produce(name)
            for piece in [out] if isinstance(out, torch.Tensor) else out:
                if piece.dtype != dtype:
                    raise RegionsError(f"tensor '{name}': produced {piece.dtype}, "
                                       f"layout says {dtype}")
                buf = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(buf.data)
                got += buf.nbytes
            if got != want:
                raise RegionsError(f"tensor '{name}': produced {got} bytes for shape {shape}, "
                                   f"expected {want}")
    return path
