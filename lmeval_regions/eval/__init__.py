"""lm-eval integration: the ``hf-regions`` model, its registration, our task suite, grids.

* :mod:`.model` -- :class:`~.model.HFRegionsLM` (``--model hf-regions``);
* :mod:`.hook` -- registers ``hf-regions`` when lm-eval's registry is imported (``.pth`` hook);
* :mod:`.console` -- the ``lm-eval-regions`` console script;
* :mod:`.tasks` -- where the task YAMLs are, a ``TaskManager`` that indexes them;
* :mod:`.ppl_task` -- the perplexity task class, data loaders and pooled perplexity;
* :mod:`.grid` -- model x region interventions x tasks, in paper 1's Table 1 layout;
* :mod:`.runs` -- lm-eval runs that return numbers to the studies.

Nothing is imported here: :mod:`.hook` runs at every interpreter start-up and must stay cheap.
"""
