"""Neuron sets (paper 2): named sets of MLP neurons, their metrics and their deactivation.

* :mod:`.sets` -- :class:`NeuronSet` artefacts and the scoped hooks that deactivate them;
* :mod:`.metrics` -- similarity maps, LRDS/SADS, z-score key neurons, LAPE, the random
  baseline and the deactivation table, with :class:`NeuronAnalysisConfig`;
* :mod:`.importer` -- published LAPE neuron files (``*.neuron.pth``) as a :class:`NeuronSet`.
"""

from lmeval_regions.neurons.importer import import_lape, read_lape_file
from lmeval_regions.neurons.metrics import (
                                            ZSCORE_EPS,
                                            KeyNeurons,
                                            NeuronAnalysisConfig,
                                            PplFn,
                                            contribution_scores,
                                            deactivation_table,
                                            direct_ppl,
                                            key_neurons,
                                            language_block_means,
                                            lape,
                                            lape_neurons,
                                            layerwise,
                                            lrds_sads,
                                            neuron_set,
                                            pair_masks,
                                            quantile,
                                            random_like,
                                            similarity,
                                            vectors,
                                            zscores,
)
from lmeval_regions.neurons.sets import (
                                            KIND,
                                            MODES,
                                            ModelLayoutError,
                                            NeuronHooks,
                                            NeuronMode,
                                            NeuronSet,
)

__all__ = ["KIND", "KeyNeurons", "MODES", "ModelLayoutError", "NeuronAnalysisConfig",
           "NeuronHooks", "NeuronMode", "NeuronSet", "PplFn", "ZSCORE_EPS",
           "contribution_scores", "deactivation_table", "direct_ppl", "import_lape",
           "key_neurons", "language_block_means", "lape", "lape_neurons", "layerwise",
           "lrds_sads", "neuron_set", "pair_masks", "quantile", "random_like",
           "read_lape_file", "similarity", "vectors", "zscores"]
