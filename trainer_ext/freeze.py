"""Compatibility path for :mod:`lmeval_regions.training.freeze`."""

from lmeval_regions.training.freeze import (
    FreezeRegionAdapter,
    FreezeRegionCallback,
    unwrap_model,
    unwrap_optimizer,
)

__all__ = ['FreezeRegionAdapter', 'FreezeRegionCallback', 'unwrap_model', 'unwrap_optimizer']
