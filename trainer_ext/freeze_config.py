"""Compatibility path for :mod:`lmeval_regions.training.freeze_config`."""

from lmeval_regions.training.freeze_config import CONFIG_NAME, REGION_NAME, FreezeRegionConfig

__all__ = ['CONFIG_NAME', 'FreezeRegionConfig', 'REGION_NAME']
