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
import mmap
import os
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open

from lmeval_regions import __version__
from lmeval_regions.artefacts.atomic import atomic_path
from lmeval_regions.artefacts.format import METADATA_KEY, read_metadata
from lmeval_regions.errors import ArtefactError, RegionsError, did_you_mean

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""madvise(2): populate the page tables of a mapping as reads would (Linux 5.14+; Python's mmap
names it from 3.12 on)."""
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
        """Within this block a tensor read is valid until the same thread reads the next one
        (a consumer done with each tensor before reading another: selection), which lets the
        reads skip the copy: each tensor is a private mapping of the file's cached pages,
        mapped in one call (``MADV_POPULATE_READ``; no page faults, no copy, half the time of
        a read at 7B scale) and unmapped when the tensor is dropped; copy-on-write, so the
        file is never changed. Where mapping fails (an older kernel, a file system without
        mmap), each thread's reads share one buffer of that thread instead (grown to the
        largest tensor read): fresh memory for every tensor cost 4-5x the read itself here."""
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

    def _mapped(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a private, populated mapping of the file (see
        :meth:`transient_reads`), or None where that cannot be done (then it is read)."""
        start, stop = self._offsets[name]
        if stop <= start or not sys.platform.startswith("linux"):
            return None
        begin = self._data_start + start
        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._data_start + stop:
                    return None  # truncated: the plain read says so (a mapping would SIGBUS)
                mm = mmap.mmap(f.fileno(), self._data_start + stop - base,
                               flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=base)
            try:
                mm.madvise(MADV_POPULATE_READ)  # map every page now: one call, no faults
            except OSError:
                mm.close()
                return None
        except (OSError, ValueError):
            return None
        raw = np.frombuffer(mm, dtype=np.uint8, count=stop - start, offset=begin - base)
        return torch.from_numpy(raw).view(self.dtypes[name]).view(self.shapes[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str, check: bool = True) -> torch.Tensor:
        """Tensor ``name``, its values checked by ``validate`` the first time it is read.
        ``check=False``: returned unchecked, for a caller whose own pass over the values can
        stand in for the check; it then calls :meth:`mark_checked` (see there)."""
        if name not in self.shapes:
            raise KeyError(name)
        # Outside transient_reads, a plain read into memory this tensor owns: a mapping would
        # keep its file pages resident (and counted in RSS) for as long as the caller holds
        # the tensor (at 7B scale ~0.8 GB more at a global selection's peak). Inside, each
        # thread holds one tensor at a time: a mapping, unmapped when the tensor is dropped.
        start, stop = self._offsets[name]
        nbytes = math.prod(self.shapes[name]) * torch.empty(0, dtype=self.dtypes[name]
                                                            ).element_size()
        if nbytes != stop - start:
            raise ArtefactError(f"'{self.path}': tensor '{name}' has {stop - start} bytes, "
                                f"expected {nbytes} for shape {self.shapes[name]}")
        out = self._mapped(name) if self._transient is not None else None
        if out is None:
            out = self._memory(name)
            if nbytes:
                self._read_into(name, start, out.view(-1).view(torch.uint8).numpy())
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
    total = 8 + len(raw) + offset
    with atomic_path(path) as tmp, _sink(tmp, total) as f:
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


DIRECT_MIN_BYTES = 64 << 20
"""Files at least this large are written with direct I/O where the file system allows it."""
_BLOCK = 1 << 12  # direct I/O: buffer address, size and file offset in multiples of this
_STAGE = 8 << 20


@contextmanager
def _sink(path: Path, total: int) -> Iterator[Any]:
    """A binary file to write ``total`` bytes into: for a large file, a :class:`_DirectWriter`
    where the file system takes direct I/O (Linux ``O_DIRECT``), else a plain buffered file.

    Why: a write through the page cache copies every byte into freshly allocated cache pages;
    on the 2-core VM that copy ran at ~100 MB/s for a 260 MB region (2.3 s of a 9-s
    extraction; 0.2 s when the cache pages were recycled ones), while direct I/O from one
    reused, aligned buffer took 0.22-0.25 s every time -- and a file written once and read
    by another command later need not sit in the cache meanwhile."""
    direct = None
    if total >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT"):
        direct = _DirectWriter.open(path)
    if direct is None:
        with open(path, "wb") as f:
            yield f
        return
    try:
        yield direct
        direct.finish()
    finally:
        direct.close()


class _DirectWriter:
    """Sequential writes through ``O_DIRECT``: bytes are staged in one page-aligned buffer
    and written in whole blocks; :meth:`finish` writes the last block padded and cuts the
    file to its length."""

    def __init__(self, fd: int):
        self.fd = fd
        self.stage = mmap.mmap(-1, _STAGE)  # anonymous memory: page-aligned
        self.view = memoryview(self.stage)
        self.used = 0
        self.length = 0

    @classmethod
    def open(cls, path: Path) -> "_DirectWriter | None":
        """The writer, or None where the file system refuses direct I/O (then write it
        buffered): probed with one block."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_DIRECT"))
        except OSError:
            return None
        writer = cls(fd)
        try:
            os.write(fd, writer.view[:_BLOCK])
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
        except OSError:
            writer.close()
            return None
        return writer

    def write(self, data: Any) -> None:
        src = memoryview(data).cast("B")
        while src.nbytes:
            n = min(src.nbytes, _STAGE - self.used)
            self.view[self.used:self.used + n] = src[:n]
            self.used += n
            src = src[n:]
            if self.used == _STAGE:
                self._flush(_STAGE)

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            done += os.write(self.fd, self.view[done:nbytes])
        self.length += self.used
        self.used = 0

    def finish(self) -> None:
        """Write what is staged (padded to a whole block) and cut the padding off."""
        if self.used:
            used = self.used
            padded = -(-used // _BLOCK) * _BLOCK
            self.view[used:padded] = bytes(padded - used)
            self._flush(padded)
        os.ftruncate(self.fd, self.length)

    def close(self) -> None:
        os.close(self.fd)
        self.view.release()
        self.stage.close()
