"""Regions: sets of parameter entries (per-parameter flat indices) and how they are made.

* :mod:`.region` -- :class:`Region`, set algebra, the artefact;
* :mod:`.ranking` -- exact rank-window selection over many tensors in bounded memory;
* :mod:`.selection` -- Top/Bottom/Middle/Random per (logical) matrix, row or globally, from
  scores in memory (:func:`select`) or in a file read tensor by tensor (:func:`select_file`;
  several files summed: :func:`select_files`);
  fused q/k/v and gate/up parameters split per logical matrix (:class:`SelectionConfig`);
* :mod:`.specs` -- regions from entry specs (``NAME[i, j]``, globs);
* :mod:`.analysis` -- distribution, Jaccard overlap, monolingual regions (Eq. 5).
"""

from lmeval_regions.regions.analysis import distribution, jaccard, layer_index, monolingual, overlap
from lmeval_regions.regions.ranking import (
                                             METHODS,
                                             check_ratio,
                                             n_select,
                                             seed_for,
                                             select_flat,
                                             select_global,
)
from lmeval_regions.regions.region import KIND, Region, index_dtype
from lmeval_regions.regions.selection import (
                                             FUSED,
                                             SCOPES,
                                             Fused,
                                             Method,
                                             Scope,
                                             SelectionConfig,
                                             check_fused,
                                             select,
                                             select_file,
                                             select_files,
                                             select_from_importance,
)
from lmeval_regions.regions.specs import from_specs

__all__ = ["FUSED", "Fused", "KIND", "METHODS", "Method", "Region", "SCOPES", "Scope",
           "SelectionConfig", "check_fused", "check_ratio",
           "distribution", "from_specs", "index_dtype", "jaccard", "layer_index",
           "monolingual", "n_select", "overlap", "seed_for", "select", "select_file",
           "select_files",
           "select_flat", "select_from_importance", "select_global"]
