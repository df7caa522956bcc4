"""Dimensional dependence (paper 1 §3.3, Appendices C-E): top dimensions and structured
removal, outlier dimensions, single-dimension and single-parameter perturbations.

* :mod:`.structured` -- rows/columns by logical orientation (module map), the four removal
  settings, the removal table;
* :mod:`.outliers` -- massive-activation and norm-weight outlier dimensions;
* :mod:`.sweep` -- single-dimension sweeps, single-parameter perturbations, generations.
"""

from lmeval_regions.dimensions.outliers import (
                                                OutlierConfig,
                                                OutlierReport,
                                                find_outliers,
                                                hidden_state_stats,
                                                massive_activation_dims,
                                                norm_weight_outliers,
                                                top_dims_per_layer,
)
from lmeval_regions.dimensions.structured import (
                                                PAPER_LABELS,
                                                SETTINGS,
                                                check_setting,
                                                dimension_counts,
                                                dims_region,
                                                hidden_dim_ranking,
                                                hidden_dims_region,
                                                removal_table,
                                                select_dims,
                                                structured_region,
)
from lmeval_regions.dimensions.sweep import (
                                                PERTURBATIONS,
                                                dimension_sweep,
                                                generate,
                                                generations,
                                                norm_perturbation,
                                                perturbation_table,
)

__all__ = ["OutlierConfig", "OutlierReport", "PAPER_LABELS", "PERTURBATIONS", "SETTINGS",
           "check_setting", "dimension_counts", "dimension_sweep", "dims_region",
           "find_outliers", "generate", "generations", "hidden_dim_ranking",
           "hidden_dims_region", "hidden_state_stats", "massive_activation_dims",
           "norm_perturbation", "norm_weight_outliers", "perturbation_table", "removal_table",
           "select_dims", "structured_region", "top_dims_per_layer"]
