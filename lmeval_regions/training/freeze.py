"""The freeze-region adapter: keep a region of a model fixed (or slowed) under any optimizer.

Zeroing gradients is not enough: AdamW's decoupled weight decay, momentum from earlier steps and
fp16/bf16 master copies still move "frozen" entries (paper 1's released code restored values
after each step, but left the masked-out gradients in the clipped norm and the optimizer moments).
This adapter does both halves, per region entry only:

1. **Gradient masking, before clipping.** A ``register_post_accumulate_grad_hook`` on each
   covered parameter zeroes the region's entries of ``p.grad`` every time a micro-batch's
   gradient is accumulated into it. It runs inside backward, so the entries are already zero
   when ``clip_grad_norm_`` (the Trainer's, or yours) computes the norm, and they never enter
   Adam's moments. Under DDP the hook runs on each rank before the reducer reads the gradient;
   under FSDP2 it runs on the sharded gradient after reduce-scatter (FSDP2 calls the sharded
   parameter's post-accumulate hooks). The Trainer's ``on_pre_optimizer_step`` would be too late
   for the norm: clipping has already happened there. The optimizer's step pre-hook masks again
   (idempotent) for loops that set ``.grad`` by hand.
2. **Restoring after each optimizer step.** ``Optimizer.register_step_post_hook`` writes the
   stored values back into the covered entries, so decay/momentum effects are undone
   bit-exactly. Skipped steps (fp16 overflow) call no hook and change nothing.

Soft variant (``alpha > 0`` or ``max_update``): the step pre-hook copies the region's entries,
the post-hook sets them to ``old + clamp(alpha * (new - old), ±max_update)``; ``alpha == 1``
without a bound hooks no step at all.

Remove then freeze/train (``init="zero"``, paper 1 Table 2): the region's entries are set to
zero when the adapter attaches, before the frozen values are stored, so freezing keeps them at
exactly zero (the release's ``param_clone.mul_(0)`` variant of its freeze script).

Memory: int64 indices plus one value per region entry (frozen values, or the pre-step copy for the
soft variant), on the parameter's device; never a dense mask. Region indices refer to full
parameters; under FSDP2 each rank keeps only the entries of its own shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.models.sharding import local, local_indices
from lmeval_regions.regions import Region
from lmeval_regions.training.freeze_config import FreezeRegionConfig


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameter names regions use (strips DDP/DataParallel's ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which has its own
    ``step`` and would not run the inner optimizer's step hooks if hooked itself)."""
    # AcceleratedOptimizer subclasses Optimizer without its hook tables: unwrap by attribute.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RegionsError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
    return optimizer


@dataclass
class _Entry:
    param: nn.Parameter
    idx: torch.Tensor          # (k_local,) int64 flat indices into local(param)
    values: torch.Tensor | None  # (k_local,) frozen values (freeze mode)
    old: torch.Tensor | None = None  # (k_local,) pre-step copy (soft mode, transient)

    def flat(self) -> torch.Tensor:
        return local(self.param).detach().view(-1)


class FreezeRegionAdapter:
    """Attach a region's protection to a model and one or more torch optimizers.

    Usage in any loop::

        adapter = FreezeRegionAdapter(model, FreezeRegionConfig("core5.safetensors"), optimizer)
        ...  # backward / clip / optimizer.step() as usual
        adapter.remove()  # or use ``with FreezeRegionAdapter(...):``

    Attach before the first backward (gradient hooks) and after FSDP2's ``fully_shard`` (so
    the hooks and indices bind to the sharded parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FreezeRegionConfig | Region | str | os.PathLike,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        apply_init: bool = True,
    ):
        """``apply_init=False`` skips ``config.init`` (a run resumed from a checkpoint, whose
        region already holds what the first attachment made of it)."""
        if isinstance(config, (Region, str, os.PathLike)):
            region = config if isinstance(config, Region) else None
            config = FreezeRegionConfig(region=str(config) if region is None else "<in memory>")
        else:
            region = None
        if not isinstance(config, FreezeRegionConfig):
            raise RegionsError(f"expected a FreezeRegionConfig, Region or region path, got "
                               f"{type(config).__name__}")
        self.config = config
        model = unwrap_model(model)
        self.region = region if region is not None else Region.load(config.region, model)
        named = dict(model.named_parameters())
        self.entries: dict[str, _Entry] = {}
        for name, full_idx in self.region.indices.items():
            if name not in named:
                raise RegionsError(f"region parameter '{name}' is not a parameter of "
                                   f"{type(model).__name__}." + did_you_mean(name, named))
            p = named[name]
            if list(p.shape) != list(self.region.shapes[name]):
                raise RegionsError(f"region parameter '{name}' has shape {self.region.shapes[name]}"
                                   f" but the model's is {list(p.shape)}")
            idx = local_indices(p, full_idx).to(local(p).device)
            if idx.numel() == 0:
                continue  # another rank's shard
            if apply_init and config.init == "zero":
                with torch.no_grad():
                    local(p).detach().view(-1).index_fill_(0, idx, 0)
            values = None
            if config.frozen:
                values = local(p).detach().reshape(-1).index_select(0, idx).clone()
            self.entries[name] = _Entry(p, idx, values)
        self._handles: list[Any] = []
        for e in self.entries.values():
            if config.mask_grads:
                self._handles.append(e.param.register_post_accumulate_grad_hook(self._grad_hook(e)))
        self.optimizers: list[torch.optim.Optimizer] = []
        if optimizer is not None:
            opts = [optimizer] if not isinstance(optimizer, (list, tuple)) else optimizer
            for opt in opts:
                self.attach_optimizer(opt)

    # ---- hooks -------------------------------------------------------------------------
    @staticmethod
    def _grad_hook(e: _Entry):
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                local(p.grad).view(-1).index_fill_(0, e.idx, 0)
        return hook

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the region's gradient entries now (what the gradient hooks do)."""
        for e in self.entries.values():
            if e.param.grad is not None:
                local(e.param.grad).view(-1).index_fill_(0, e.idx, 0)

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.config.mask_grads:
            self.mask_grads()
        if not self.config.frozen and not self.config.free:
            for e in self.entries.values():
                e.old = e.flat().index_select(0, e.idx)

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        if self.config.frozen:
            self.restore()
            return
        if self.config.free:
            return
        alpha, bound = self.config.alpha, self.config.max_update
        for e in self.entries.values():
            if e.old is None:
                continue
            flat = e.flat()
            delta = flat.index_select(0, e.idx).sub_(e.old)
            if alpha != 1.0:
                delta.mul_(alpha)
            if bound is not None:
                delta.clamp_(-bound, bound)
            flat.index_copy_(0, e.idx, e.old.add_(delta))
            e.old = None

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen values back (freeze mode)."""
        for e in self.entries.values():
            if e.values is not None:
                e.flat().index_copy_(0, e.idx, e.values)

    # ---- lifecycle ---------------------------------------------------------------------
    def attach_optimizer(self, optimizer: Any) -> None:
        """Hook an optimizer's steps (an accelerate wrapper is unwrapped)."""
        opt = unwrap_optimizer(optimizer)
        self._handles.append(opt.register_step_pre_hook(self._pre_step))
        self._handles.append(opt.register_step_post_hook(self._post_step))
        self.optimizers.append(opt)

    def remove(self) -> None:
        """Remove every hook this adapter added (the parameters keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.optimizers.clear()

    def __enter__(self) -> "FreezeRegionAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: indices, and values (frozen values or the soft pre-step copy)."""
        idx = sum(e.idx.numel() * e.idx.element_size() for e in self.entries.values())
        val = sum(e.idx.numel() * local(e.param).element_size() for e in self.entries.values())
        return {"indices": idx, "values": val, "total": idx + val,
                "entries": sum(e.idx.numel() for e in self.entries.values())}


class FreezeRegionCallback(TrainerCallback):
    """Wire a :class:`FreezeRegionAdapter` into ``transformers.Trainer``.

    Attaches at ``on_train_begin`` (after the model is prepared and, when resuming, loaded from
    the checkpoint, before the first backward) to the model and the Trainer's optimizer; removes
    its hooks at ``on_train_end``. ``init="zero"`` zeroes the region only when training starts
    at step 0 (a resumed run's checkpoint already holds the result).
    """

    def __init__(self, config: FreezeRegionConfig):
        if not isinstance(config, FreezeRegionConfig):
            raise RegionsError(f"FreezeRegionCallback needs a FreezeRegionConfig, got "
                               f"{type(config).__name__}")
        self.config = config
        self.adapter: FreezeRegionAdapter | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.adapter is not None:
            self.adapter.remove()
        if model is None or optimizer is None:
            raise RegionsError("FreezeRegionCallback needs the Trainer's model and optimizer")
        self.adapter = FreezeRegionAdapter(model, self.config, optimizer,
                                           apply_init=state.global_step == 0)

    def on_train_end(self, args, state, control, **kwargs):
        if self.adapter is not None:
            self.adapter.remove()
