"""Compatibility path for :mod:`lmeval_regions.training.importance_callback`."""

from lmeval_regions.training.importance_callback import (
    ARTEFACT_NAME,
    STATE_KIND,
    STATE_NAME,
    ImportanceCallback,
)

__all__ = ['ARTEFACT_NAME', 'ImportanceCallback', 'STATE_KIND', 'STATE_NAME']
