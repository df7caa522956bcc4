"""Activations: MLP neuron activations pooled per sample of a parallel corpus, streamed to an
artefact (paper 2 §3.1), and read back as :class:`Activations`."""

from lmeval_regions.activations.capture import (
                                                ACT_SITE,
                                                KIND,
                                                LAPE_SITES,
                                                SITE,
                                                ActivationConfig,
                                                Activations,
                                                activation_probabilities,
                                                capture,
)

__all__ = ["ACT_SITE", "ActivationConfig", "Activations", "KIND", "LAPE_SITES", "SITE",
           "activation_probabilities", "capture"]
