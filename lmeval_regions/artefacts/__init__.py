"""Artefact files: safetensors + JSON metadata, written atomically, read lazily.

* :mod:`.atomic` -- :func:`atomic_path`, :func:`write_text_atomic` (every file we write),
  :func:`umask_permissions` (temporary files and folders made readable as the umask allows);
* :mod:`.format` -- :func:`save_artefact` / :func:`load_artefact` / :func:`read_metadata`, the
  model fingerprint and its check, :func:`file_digest`;
* :mod:`.locks` -- :func:`locked`: one writer per output across processes;
* :mod:`.streaming` -- :class:`LazyScores` (one tensor in memory at a time) and
  :func:`write_safetensors` (tensor-by-tensor writing) for artefacts of any size.
"""

from lmeval_regions.artefacts.atomic import atomic_path, umask_permissions, write_text_atomic
from lmeval_regions.artefacts.format import (
                                             METADATA_KEY,
                                             check_fingerprint,
                                             check_same_model,
                                             file_digest,
                                             iter_tensors,
                                             load_artefact,
                                             model_fingerprint,
                                             read_metadata,
                                             save_artefact,
)
from lmeval_regions.artefacts.locks import lock_file, locked
from lmeval_regions.artefacts.streaming import DTYPES, LazyScores, torch_dtype, write_safetensors

__all__ = ["DTYPES", "METADATA_KEY", "LazyScores", "atomic_path", "check_fingerprint",
           "check_same_model", "file_digest", "iter_tensors", "load_artefact", "lock_file",
           "locked", "model_fingerprint", "read_metadata",
           "save_artefact", "torch_dtype", "umask_permissions", "write_safetensors",
           "write_text_atomic"]
