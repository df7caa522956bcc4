"""Activations: MLP neuron activations pooled per sample of a parallel corpus, streamed to an
artefact (paper 2 §3.1), and read back as :class:`Activations`."""

from lmeval_regions.activations.capture import (KIND, SITE, ActivationConfig, Activations,
                                                capture)

__all__ = ["ActivationConfig", "Activations", "KIND", "SITE", "capture"]
