"""Importance over a corpus: :class:`ImportanceConfig` and :func:`compute_importance`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import model_fingerprint
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance.accumulator import MODES, ImportanceAccumulator, Mode
from lmeval_regions.importance.artefact import Importance
from lmeval_regions.models.architecture import block_parameters
from lmeval_regions.models.module_map import matrix_layouts


@dataclass
class ImportanceConfig:
    """What to accumulate and over which parameters."""

    mode: Mode = "abs_sum"
    """``abs_sum`` (Σ|θ·g|, paper Eq. 4) or ``sum_abs`` (|Σθ·g|, the released code)."""
    include: tuple[str, ...] | None = None
    """Glob patterns of parameter names (``re:`` for regex); None = 2-D weights in blocks."""
    include_norms: bool = False
    """Also score 1-D norm weights inside blocks (paper 1's code kept them)."""
    dtype: Literal["float32", "bfloat16"] = field(default="float32",
                                                  metadata={"flag": "accumulator-dtype"})
    """Accumulator dtype: ``float32`` (default) or ``bfloat16`` (stochastic rounding, 7B scale)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RegionsError(f"importance mode '{self.mode}' is not one of {MODES}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RegionsError(f"accumulator dtype '{self.dtype}' is not 'float32' or 'bfloat16'")
        if self.include is not None:
            self.include = tuple(self.include)


def compute_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: ImportanceConfig | None = None,
    languages: list[str] | None = None,
    sources: list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> Importance:
    """Accumulate importance over ``batches`` (dicts with ``input_ids``, ``attention_mask``,
    ``labels``; labels -100 are ignored) without changing any weight.

    Each batch's loss is the model's mean token cross-entropy; its gradient is taken once per
    batch. Only included parameters get gradients (others are frozen for the duration), which
    keeps memory to the accumulators plus the included parameters' gradients.
    """
    from tqdm.auto import tqdm

    config = config or ImportanceConfig()
    params = block_parameters(model, config.include, config.include_norms)
    acc = ImportanceAccumulator(params, config.mode, config.dtype)
    was_training = model.training
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    include_ids = {id(p) for p in params.values()}
    n_seq = n_tok = 0
    model.eval()  # no dropout: importance of the model as it is
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in include_ids)
        device = next(iter(params.values())).device
        for batch in tqdm(batches, desc="importance", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            out.loss.backward()
            acc.accumulate()
            for p in params.values():
                p.grad = None
            n_seq += int(batch["input_ids"].shape[0])
            labels = batch.get("labels", batch["input_ids"])
            n_tok += int((labels[:, 1:] != -100).sum())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    return Importance(
        scores=acc.result(), mode=config.mode, model=model_fingerprint(model),
        languages=list(languages or []), n_sequences=n_seq, n_tokens=n_tok,
        n_skipped=acc.n_skipped, sources=list(sources or []),
        extra={"include": list(config.include) if config.include else "blocks-2d",
               "include_norms": config.include_norms, "accumulator_dtype": config.dtype,
               # logical q/k/v (gate/up) of fused weights, [in, out] storage: per-matrix
               # selection from this file needs them and has no model
               **matrix_layouts(model, params)},
    )
