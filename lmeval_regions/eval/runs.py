"""lm-eval runs that return numbers to the studies (the neuron deactivation table)."""

from __future__ import annotations

from lmeval_regions.errors import RegionsError
from lmeval_regions.neurons.metrics import PplFn


def lm_eval_ppl(pretrained: str, neurons_path: str, mode: str = "zero", limit: int | None = None,
                device: str = "cpu", batch_size: int = 1) -> PplFn:
    """Perplexity through lm-eval: model ``hf-regions`` with ``neurons=PATH,neuron_set=...``
    and the ``udhr_ppl_<lang>`` tasks (from ``lmeval_regions.tasks``)."""
    import lm_eval

    import lmeval_regions.eval.model  # noqa: F401  (registers hf-regions)
    from lmeval_regions.eval.tasks import task_manager

    # The perplexity tasks count tokens with the model's tokenizer: name it in their metadata.
    tm = task_manager(metadata={"pretrained": pretrained})

    def ppl(set_name: str | None, lang: str) -> float:
        # add_bos_token=False: BOS is context only, as in the direct computation
        args = {"pretrained": pretrained, "device": device, "add_bos_token": False}
        if set_name is not None:
            args |= {"neurons": neurons_path, "neuron_set": set_name,
                     "neuron_intervention": mode}
        task = f"udhr_ppl_{lang}"
        res = lm_eval.simple_evaluate(model="hf-regions", model_args=args, tasks=[task],
                                      task_manager=tm, limit=limit, batch_size=batch_size)
        metrics = res["results"][task]
        for key in ("token_perplexity,none", "perplexity,none", "word_perplexity,none"):
            if key in metrics:
                return float(metrics[key])
        raise RegionsError(f"task {task} reported no perplexity metric: {sorted(metrics)}")

    return ppl
