"""Criteria that need no gradient buffer: ``magnitude`` |θ| and ``wanda`` |W|·‖X‖.

``wanda`` (Sun et al., 2024, "A simple and effective pruning approach for LLMs"): for a linear
weight ``W[out, in]`` the score of ``W_ij`` is ``|W_ij| · ‖X_j‖₂``, where ``‖X_j‖₂`` is the L2
norm of input feature ``j`` over every non-pad token of the corpus (``attention_mask == 1``).
:class:`InputNorms` accumulates ``Σ_tokens x_j²`` with a forward pre-hook on each module that
owns an included weight: ``nn.Linear`` (``W[out, in]``, norms broadcast over rows) or GPT-2's
``Conv1D`` (``W[in, out]``, norms broadcast over columns). Any other owner (an embedding, a norm
scale, a bias) is refused with the parameter's name.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.sharding import is_sharded, local


def magnitude_scores(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``|θ|`` of each parameter as new fp32 tensors (this rank's rows under FSDP2)."""
    return {n: local(p.detach()).float().abs() for n, p in params.items()}


def _orientation(name: str, module: nn.Module, p: nn.Parameter) -> str:
    """``"in_last"`` for ``nn.Linear`` (``[out, in]``), ``"in_first"`` for GPT-2 ``Conv1D``."""
    if p.dim() != 2:
        raise RegionsError(f"criterion 'wanda' scores 2-D weights of linear layers; '{name}' has "
                           f"shape {list(p.shape)} (drop include_norms, or choose other criteria)")
    if isinstance(module, nn.Linear):
        return "in_last"
    if type(module).__name__ == "Conv1D":
        if is_sharded(p):  # FSDP2 shards dim 0, which is Conv1D's input dimension
            raise RegionsError(f"criterion 'wanda' on the sharded Conv1D weight '{name}' is not "
                               "supported (its rows are input features split across ranks)")
        return "in_first"
    raise RegionsError(f"criterion 'wanda' needs each weight to belong to an nn.Linear or a "
                       f"GPT-2 Conv1D; '{name}' belongs to {type(module).__name__}")


class InputNorms:
    """``Σ x_j²`` over non-pad tokens of the inputs of the modules owning ``params``.

    Usage: :meth:`attach` once, then per batch :meth:`begin` (with its attention mask), the
    forward pass, and :meth:`commit` (or nothing, to drop a skipped batch); :meth:`remove` at
    the end. Sums are fp64 vectors ``[in_features]`` per parameter.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]):
        self.owners: dict[str, tuple[nn.Module, str]] = {}
        for name, p in params.items():
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path) if path else model
            if attr != "weight" or getattr(module, attr, None) is not p:
                raise RegionsError(f"criterion 'wanda' scores module weights; '{name}' is not the "
                                   f"'weight' of a module")
            self.owners[name] = (module, _orientation(name, module, p))
        self.sums: dict[str, torch.Tensor] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        for name, (module, _) in self.owners.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin(self, attention_mask: torch.Tensor | None) -> None:
        """Start a batch: tokens with ``attention_mask == 0`` are padding and not counted."""
        self._mask = attention_mask
        self._batch = {}

    def commit(self) -> None:
        """Add the batch's sums to the totals."""
        for name, sq in self._batch.items():
            if name in self.sums:
                self.sums[name] += sq
            else:
                self.sums[name] = sq
        self._batch = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = self._mask
            with torch.no_grad():
                sq = x.float().square()
                if m is not None:
                    if tuple(x.shape[:-1]) == tuple(m.shape):
                        w = m
                    elif x.dim() == 2 and x.shape[0] == m.numel():  # flattened tokens
                        w = m.reshape(-1)
                    else:
                        raise RegionsError(f"input of '{name}' has shape {list(x.shape)}, which "
                                           f"does not match the attention mask {list(m.shape)}")
                    sq = sq * w.to(sq.dtype).unsqueeze(-1)
                total = sq.reshape(-1, x.shape[-1]).sum(0).double()
            prev = self._batch.get(name)
            self._batch[name] = total if prev is None else prev + total
        return hook

    def scores(self, params: Mapping[str, nn.Parameter], sums: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """``|W| · sqrt(Σ x²)`` per entry, fp32, the weight's shape (this rank's rows)."""
        out = {}
        for name, p in params.items():
            w = local(p.detach()).float().abs()
            sq = sums.get(name)
            if sq is None:  # the module never ran: no input seen
                norm = torch.zeros(w.shape[1] if self.owners[name][1] == "in_last" else w.shape[0])
            else:
                norm = sq.sqrt().float()
            norm = norm.to(w.device)
            out[name] = w * (norm[None, :] if self.owners[name][1] == "in_last" else norm[:, None])
        return out
