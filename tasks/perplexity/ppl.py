"""The perplexity tasks' functions, for ``!function ppl.X`` in the YAMLs beside this file.

They live in :mod:`lmeval_regions.eval.ppl_task` (one implementation, importable and tested
like the rest of the package); lm-eval looks for ``ppl.py`` next to the YAML.
"""

from lmeval_regions.eval.ppl_task import (PerplexityTask, load_text, load_udhr,
                                          pooled_perplexity, weighted_perplexity)

__all__ = ["PerplexityTask", "load_text", "load_udhr", "pooled_perplexity", "weighted_perplexity"]
