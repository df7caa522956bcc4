"""Perplexity, computed one way everywhere.

* :func:`ppl_from_sums` -- ``exp(Σ NLL / Σ tokens)``, saturating to inf (a broken model's
  perplexity overflows a float); the lm-eval tasks pool their sums with it too;
* :func:`batch_perplexity` -- over token batches (any of :mod:`lmeval_regions.corpora`);
* :func:`perplexity` -- the direct computation on texts: each text one window of at most
  ``max_length`` tokens, the prefix token (BOS, else EOS) conditioning only, every text token
  scored (the conditioning rule of :mod:`lmeval_regions.corpora.batches`);
* :func:`perplexities` / :func:`make_evaluator` -- per language and pooled over languages
  (what ``apply``, the dimension studies, the neuron table and the training recipe report).

Evaluation through lm-eval (``hf-regions`` + our perplexity tasks) gives the same figures on the
same windows (tests/test_tasks.py checks it); use it for anything published.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch

from lmeval_regions.corpora.batches import batches


def ppl_from_sums(nll: float, tokens: float) -> float:
    """``exp(nll / tokens)``: inf on overflow, nan without tokens."""
    if not tokens:
        return float("nan")
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


@torch.no_grad()
def batch_perplexity(model, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token perplexity over ``batches`` (``input_ids``, ``attention_mask``, ``labels``, each
    ``(batch, seq)``; labels -100 are not scored, position 0 never is):
    ``{"ppl", "nll", "tokens"}``. Logits are taken in fp32. Works on any batches of
    :mod:`lmeval_regions.corpora` (``batches``, a ``CorpusConfig`` token stream)."""
    nll = 0.0
    n = 0
    device = next(model.parameters()).device
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = b["labels"][:, 1:]
        mask = tgt != -100
        tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok_lp[mask].sum())
        n += int(mask.sum())
    return {"ppl": ppl_from_sums(nll, n), "nll": nll, "tokens": n}


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256,
               batch_size: int = 1, longest_first: bool = False) -> dict[str, float]:
    """Token perplexity of ``texts`` under ``model``: ``{"ppl", "nll", "tokens"}``.

    Each text is one sequence, ``[prefix] + tokens`` truncated to ``max_length`` tokens (the
    conditioning rule of :mod:`lmeval_regions.corpora.batches`): the prefix (BOS, else EOS) is
    context only, every text token is scored, as lm-eval's ``loglikelihood_rolling`` with
    ``add_bos_token=False`` scores a text that fits one window. ``longest_first``: batch the
    texts longest first (less padding; the same sums up to float rounding).
    """
    return batch_perplexity(model, batches(tokenizer, texts, batch_size, max_length,
                                           longest_first))


def perplexities(model, tokenizer, texts: Mapping[str, list[str]], max_length: int = 256,
                 batch_size: int = 1) -> dict[str, Any]:
    """Per-language and pooled perplexity of ``texts`` (``lang -> texts``):
    ``{"ppl": pooled, "ppl_per_lang": {lang: ppl}, "nll": Σ, "tokens": Σ}``."""
    per, nll, n = {}, 0.0, 0
    for lang, tx in texts.items():
        r = perplexity(model, tokenizer, tx, max_length, batch_size)
        per[lang] = r["ppl"]
        nll += r["nll"]
        n += r["tokens"]
    return {"ppl": ppl_from_sums(nll, n), "ppl_per_lang": per, "nll": nll, "tokens": n}


def make_evaluator(model, tokenizer, texts: Mapping[str, list[str]], max_length: int = 256,
                   batch_size: int = 4) -> Callable[[], dict[str, Any]]:
    """A callable giving :func:`perplexities` of ``texts`` with the model as it is now (for
    studies that evaluate after each edit)."""
    def evaluate() -> dict[str, Any]:
        r = perplexities(model, tokenizer, texts, max_length, batch_size)
        return {"ppl": r["ppl"], "ppl_per_lang": r["ppl_per_lang"]}

    return evaluate
