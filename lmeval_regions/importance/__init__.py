"""Importance: per-parameter scores over a corpus, as an artefact.

* :mod:`.accumulator` -- :class:`ImportanceAccumulator` for the gradient criteria (fp32 or
  stochastic-rounding bf16 buffers; FSDP2 local shards), shared with the Trainer callback;
* :mod:`.criteria` -- ``magnitude`` |θ| and ``wanda`` |W|·‖X‖ (input norms by forward hooks);
* :mod:`.compute` -- :class:`ImportanceConfig`, :class:`ImportancePass` (every criterion in one
  pass), :func:`compute_importance` and :func:`iter_importances` (cumulative snapshots);
* :mod:`.artefact` -- :class:`Importance` (scores + provenance, checked when read),
  :func:`combine`, :class:`SummedScores` (the same sum over files, read tensor by tensor),
  :func:`combine_files`, :func:`check_summable`, :func:`combined_meta`;
* :mod:`.shards` -- per-rank files under FSDP2 and their merge.
"""

from lmeval_regions.importance.accumulator import (
                                                   CRITERIA,
                                                   GRADIENT_CRITERIA,
                                                   Criterion,
                                                   ImportanceAccumulator,
                                                   add_stochastic_bf16,
)
from lmeval_regions.importance.artefact import (
                                                   KIND,
                                                   NON_NEGATIVE,
                                                   Importance,
                                                   SummedScores,
                                                   check_scores,
                                                   check_summable,
                                                   combine,
                                                   combine_files,
                                                   combined_meta,
                                                   criterion_of,
                                                   lazy_scores,
)
from lmeval_regions.importance.compute import (
                                                   ImportanceConfig,
                                                   ImportancePass,
                                                   PassState,
                                                   compute_importance,
                                                   iter_importances,
)
from lmeval_regions.importance.criteria import InputNorms, magnitude_scores
from lmeval_regions.importance.shards import merge_shards, save_shard, shard_path, shard_paths

__all__ = ["CRITERIA", "GRADIENT_CRITERIA", "KIND", "NON_NEGATIVE", "Criterion", "Importance",
           "ImportanceAccumulator", "ImportanceConfig", "ImportancePass", "InputNorms",
           "PassState", "SummedScores", "add_stochastic_bf16", "check_scores", "check_summable",
           "combine", "combine_files", "combined_meta", "compute_importance", "criterion_of",
           "lazy_scores",
           "iter_importances", "magnitude_scores", "merge_shards", "save_shard", "shard_path",
           "shard_paths"]
