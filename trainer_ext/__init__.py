"""Training-time tools for ``transformers.Trainer`` and any torch loop (the public import path).

- :class:`ImportanceCallback`: paper 1's importance accumulated from each optimizer step
  (same artefact as :mod:`lmeval_regions.importance`).
- :class:`FreezeRegionConfig` / :class:`FreezeRegionAdapter` / :class:`FreezeRegionCallback`:
  keep a region bit-identical (or scale/clamp its updates) under any torch optimizer.

The implementation is :mod:`lmeval_regions.training`; this package re-exports it.
"""

from lmeval_regions.training import (
                                     FreezeRegionAdapter,
                                     FreezeRegionCallback,
                                     FreezeRegionConfig,
                                     ImportanceCallback,
                                     unwrap_model,
                                     unwrap_optimizer,
)

__all__ = ["FreezeRegionAdapter", "FreezeRegionCallback", "FreezeRegionConfig",
           "ImportanceCallback", "unwrap_model", "unwrap_optimizer"]
