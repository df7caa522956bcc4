"""Training-time tools: importance during training and region protection.

- :class:`ImportanceCallback`: paper 1's importance accumulated from each optimizer step of
  ``transformers.Trainer`` (same artefact as :mod:`lmeval_regions.importance`).
- :class:`FreezeRegionConfig` / :class:`FreezeRegionAdapter` / :class:`FreezeRegionCallback`:
  keep a region bit-identical (or scale/clamp its updates) under any torch optimizer.

``trainer_ext`` (the import path training users know) re-exports these.
"""

from lmeval_regions.training.freeze import (
                                            FreezeRegionAdapter,
                                            FreezeRegionCallback,
                                            unwrap_model,
                                            unwrap_optimizer,
)
from lmeval_regions.training.freeze_config import FreezeRegionConfig
from lmeval_regions.training.importance_callback import ImportanceCallback

__all__ = ["FreezeRegionAdapter", "FreezeRegionCallback", "FreezeRegionConfig",
           "ImportanceCallback", "unwrap_model", "unwrap_optimizer"]
