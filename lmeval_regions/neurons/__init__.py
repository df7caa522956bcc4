"""Neuron sets (paper 2): named sets of MLP neurons, their metrics and their deactivation.

* :mod:`.sets` -- :class:`NeuronSet` artefacts and the scoped hooks that deactivate them;
* :mod:`.metrics` -- similarity maps, LRDS/SADS, z-score key neurons, LAPE, the random
  baseline and the deactivation table.
"""

from lmeval_regions.neurons.metrics import (KeyNeurons, PplFn, contribution_scores,
                                            deactivation_table, direct_ppl, key_neurons,
                                            language_block_means, lape, layerwise, lrds_sads,
                                            neuron_set, pair_masks, random_like, similarity,
                                            vectors, zscores)
from lmeval_regions.neurons.sets import (KIND, MODES, ModelLayoutError, NeuronHooks, NeuronMode,
                                         NeuronSet)

__all__ = ["KIND", "KeyNeurons", "MODES", "ModelLayoutError", "NeuronHooks", "NeuronMode",
           "NeuronSet", "PplFn", "contribution_scores", "deactivation_table", "direct_ppl",
           "key_neurons", "language_block_means", "lape", "layerwise", "lrds_sads",
           "neuron_set", "pair_masks", "random_like", "similarity", "vectors", "zscores"]
