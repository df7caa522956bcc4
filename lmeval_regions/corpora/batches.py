"""Token sequences and batches for importance, activations and direct perplexity, under one
conditioning rule (the one lm-eval's evaluation applies; docs/corpora.md, "Conditioning").

**The rule.** A text is tokenised without special tokens, as ``HFLM.tok_encode`` does with
``add_bos_token=False`` (the model_args of our demo, grid and README: lm-eval passes
``add_special_tokens=False`` to ``tokenizer.encode``, ``lm_eval/models/huggingface.py``
``tok_encode`` and ``models/utils.py`` ``_add_special_kwargs``). It is preceded by lm-eval's
prefix token: the tokenizer's BOS, else its EOS (``HFLM.prefix_token_id``). The prefix is
context only; every text token is scored, the first one predicted from the prefix
(``lm_eval/utils.py`` ``get_rolling_token_windows``, whose first window is ``[prefix] +
tokens`` predicting ``tokens``). For a tokenizer that prepends BOS by default (Gemma, Llama)
this is exactly ``tokenizer(text)``; for one that adds nothing (SmolLM2, GPT-2, GPT-NeoX,
BLOOM) the prefix is added here, so importance, activations and perplexity see the same
sequence lm-eval scores.

**Sequences** are ``(ids, labels)`` lists. ``labels`` are the ids, with -100 on tokens that
are context only (besides position 0, which a causal LM never predicts: its label is the id,
as ``tokenizer(...)`` gave it, and the model's shift drops it):

* :func:`single_sequences` -- one sequence per document, ``[prefix] + tokens`` truncated to
  ``max_length`` (``max_length - 1`` scored tokens at most);
* :func:`packed_sequences` -- documents concatenated, each preceded by the prefix token (context
  only, so every document starts as lm-eval conditions it), cut into sequences of
  ``max_length`` tokens that overlap by one token: the last token of a sequence is the first
  (conditioning) token of the next, as lm-eval's rolling windows condition each window on the
  previous token (``context_len=1``). The last sequence is filled on the left with already
  scored tokens (labels -100), as lm-eval's last window is. Every token is used, every text
  token scored exactly once. On one document this is lm-eval's ``loglikelihood_rolling`` with
  ``max_length = max_length - 1`` (lm-eval counts the model's input, which excludes the last
  token).

:func:`collate` right-pads sequences into the batch dicts every consumer takes
(``input_ids``, ``attention_mask``, ``labels``, each ``(batch, seq)`` int64).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Literal

import torch

from lmeval_regions.errors import RegionsError

RULE = "lm-eval-prefix"
"""Name of the conditioning rule recorded in artefacts (see the module docstring)."""

Sequence = tuple[list[int], list[int]]
"""``(ids, labels)`` of one model input; labels -100 on context-only tokens."""


@dataclass(frozen=True)
class Conditioning:
    """The prefix token a tokenizer's texts are conditioned on (lm-eval's ``prefix_token_id``)."""

    prefix_token_id: int
    """The token id preceding every text (context only)."""
    prefix: Literal["bos", "eos"]
    """Which special token it is: the tokenizer's BOS, or its EOS when it has no BOS."""

    @classmethod
    def of(cls, tokenizer) -> Conditioning:
        """The rule for ``tokenizer``: BOS if it has one, else EOS (as ``HFLM.prefix_token_id``)."""
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None:
            return cls(int(bos), "bos")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            return cls(int(eos), "eos")
        raise RegionsError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS "
                           "token; one is needed to condition the first token of a text on "
                           "(as lm-eval's prefix_token_id)")

    def metadata(self) -> dict:
        """What artefacts record: ``{"rule", "prefix", "prefix_token_id",
        "add_special_tokens"}``."""
        return {"rule": RULE, "prefix": self.prefix, "prefix_token_id": self.prefix_token_id,
                "add_special_tokens": False}


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens (``HFLM.tok_encode`` with
    ``add_bos_token=False``); never truncated."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False,
                                           verbose=False)["input_ids"]]


def encode_lazily(tokenizer, texts: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
    """:func:`encode` over an iterable, ``chunk`` texts at a time (a stream stays a stream)."""
    it = iter(texts)
    while block := list(islice(it, chunk)):
        yield from encode(tokenizer, block)


def pad_id(tokenizer) -> int:
    """The id padding positions get (masked out and labelled -100, so only for the tensors'
    sake): the pad token, else EOS, else the prefix."""
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return Conditioning.of(tokenizer).prefix_token_id


def single_sequences(docs: Iterable[list[int]], cond: Conditioning, max_length: int
                     ) -> Iterator[Sequence]:
    """One sequence per document: ``[prefix] + tokens``, truncated to ``max_length``."""
    for toks in docs:
        ids = ([cond.prefix_token_id] + list(toks))[:max_length]
        yield ids, list(ids)


def packed_sequences(docs: Iterable[list[int]], cond: Conditioning, max_length: int
                     ) -> Iterator[Sequence]:
    """Documents packed into ``max_length``-token sequences (see the module docstring)."""
    if max_length < 2:
        raise RegionsError(f"max_length {max_length} must be >= 2 (one token to condition on, "
                           "one to score)")
    ids: list[int] = []
    labels: list[int] = []
    prev: list[int] | None = None  # the last full sequence, for the final left fill
    for toks in docs:
        for i, tok in enumerate([cond.prefix_token_id] + list(toks)):
            ids.append(tok)
            labels.append(-100 if i == 0 else tok)  # the document's prefix is context only
            if len(ids) == max_length:
                labels[0] = ids[0]
                yield ids, labels
                prev = ids
                ids, labels = [ids[-1]], [-100]  # the next sequence is conditioned on it
    if len(ids) > 1:  # tokens left: the last sequence, filled on the left with scored ones
        if prev is not None:
            fill = prev[:-1][-(max_length - len(ids)):] if max_length > len(ids) else []
            ids, labels = fill + ids, [-100] * len(fill) + labels
        labels[0] = ids[0]
        yield ids, labels


def scored(seq: Sequence) -> int:
    """Number of tokens a sequence scores (labels after position 0 that are not -100)."""
    return sum(1 for lab in seq[1][1:] if lab != -100)


def collate(seqs: Iterable[Sequence], batch_size: int, pad: int
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of ``batch_size`` sequences: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on padding), each ``(batch, longest)`` int64."""
    it = iter(seqs)
    while block := list(islice(it, batch_size)):
        n = max(len(ids) for ids, _ in block)
        ids = torch.full((len(block), n), pad, dtype=torch.long)
        mask = torch.zeros((len(block), n), dtype=torch.long)
        labels = torch.full((len(block), n), -100, dtype=torch.long)
        for row, (i, lab) in enumerate(block):
            ids[row, :len(i)] = torch.tensor(i, dtype=torch.long)
            mask[row, :len(i)] = 1
            labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 256,
            longest_first: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with ``labels`` (-100 on padding) for causal-LM loss, one text per
    sequence: ``[prefix] + tokens`` truncated to ``max_length`` (the module's rule; for a
    tokenizer that prepends BOS this is exactly ``tokenizer(texts, truncation=True, ...)``).

    ``longest_first``: batch the sequences longest first (stable), so that each batch pads to
    nearly its own length -- for sums over tokens (perplexity), which do not depend on which
    texts share a batch; never for importance, whose per-batch estimator does."""
    if max_length < 2:
        raise RegionsError(f"max_length {max_length} must be >= 2 (one token to condition on, "
                           "one to score)")
    cond = Conditioning.of(tokenizer)
    seqs: Iterable[Sequence] = single_sequences(encode_lazily(tokenizer, texts), cond,
                                                max_length)
    if longest_first:
        seqs = sorted(seqs, key=lambda s: len(s[0]), reverse=True)
    return collate(seqs, batch_size, pad_id(tokenizer))
