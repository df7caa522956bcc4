"""Importance: per-parameter |θ ⊙ ∇L| over a corpus, as an artefact.

* :mod:`.accumulator` -- :class:`ImportanceAccumulator` (fp32 or stochastic-rounding bf16
  buffers; FSDP2 local shards), shared with the Trainer callback;
* :mod:`.compute` -- :class:`ImportanceConfig` and :func:`compute_importance`;
* :mod:`.artefact` -- :class:`Importance` (scores + provenance) and :func:`combine`;
* :mod:`.shards` -- per-rank files under FSDP2 and their merge.
"""

from lmeval_regions.importance.accumulator import (MODES, ImportanceAccumulator, Mode,
                                                   add_stochastic_bf16)
from lmeval_regions.importance.artefact import KIND, Importance, combine
from lmeval_regions.importance.compute import ImportanceConfig, compute_importance
from lmeval_regions.importance.shards import merge_shards, save_shard, shard_path, shard_paths

__all__ = ["KIND", "MODES", "Importance", "ImportanceAccumulator", "ImportanceConfig", "Mode",
           "add_stochastic_bf16", "combine", "compute_importance", "merge_shards", "save_shard",
           "shard_path", "shard_paths"]
