"""lmeval-regions: find, inspect, ablate and protect the linguistic regions of LLMs.

The flow, one module per step::

    corpora -> importance (or activations) -> regions (or neuron sets)
            -> interventions on a loaded model -> lm-eval evaluation / protection in training
"""

__version__ = "0.1.0"
