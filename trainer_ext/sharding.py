"""Compatibility path for :mod:`lmeval_regions.models.sharding` (FSDP2 local-shard arithmetic)."""

from lmeval_regions.models.sharding import (
                                            full_tensor,
                                            is_sharded,
                                            local,
                                            local_flat_range,
                                            local_indices,
                                            local_rows,
                                            local_slice,
)

__all__ = ["full_tensor", "is_sharded", "local", "local_flat_range", "local_indices",
           "local_rows", "local_slice"]
