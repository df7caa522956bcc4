"""Compatibility path: ``lmeval_regions.lm:HFRegionsLM`` (lm-eval registrations and user code
written before the package was layered). The model lives in :mod:`lmeval_regions.eval.model`."""

from lmeval_regions.eval.model import MODEL_NAME, OUR_KEYS, HFRegionsLM

__all__ = ["HFRegionsLM", "MODEL_NAME", "OUR_KEYS"]
