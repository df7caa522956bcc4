"""Token batches for importance, activations and direct perplexity."""

from __future__ import annotations

from typing import Iterator

import torch


def batches(tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 256
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with ``labels`` (-100 on padding) for causal-LM loss.

    Texts are tokenised as the tokenizer does by default (a BOS where the model expects one)
    and truncated to ``max_length`` tokens.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, padding_side="right")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": labels}
