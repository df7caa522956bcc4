"""``ImportanceCallback``: paper 1's importance accumulated during Trainer training.

One gradient criterion per callback (default ``sum_abs``, paper 1's |Σ_t θ_t ⊙ g_t|, which is
|θ ⊙ Σ_t g_t| when the learning rate is 0; ``abs_sum`` and ``fisher`` on request). ``magnitude``
and ``wanda`` are not accumulated from training steps (compute them with
:func:`~lmeval_regions.importance.iter_importances`); snapshots neither.

When the gradients are read (transformers 5.23, ``Trainer._run_epoch``): after the last
micro-batch's backward, the Trainer unscales (fp16) and clips the gradients
(``_clip_grad_norm``, whenever ``max_grad_norm > 0``), then fires ``on_pre_optimizer_step``,
then calls ``optimizer.step()``. The callback accumulates at ``on_pre_optimizer_step``: one
contribution per optimizer step, from the gradient summed over the accumulated micro-batches
(DDP: already all-reduced), unscaled and clipped, with θ the weights *before* the step.

``before_clip=True`` scores the gradients as they were before clipping: call
:meth:`ImportanceCallback.attach` with the trainer, which wraps that trainer instance's
``_clip_grad_norm`` to record the pre-clip norm n; the contribution is then scaled by
``1 / min(1, max_grad_norm / (n + 1e-6))`` (torch's clip coefficient), which undoes the clipping
up to fp32 rounding without touching the gradients the optimizer uses.

A step with any non-finite gradient (e.g. an fp16 overflow step) is skipped whole and counted
(``n_skipped``). The artefact is the library's :class:`~lmeval_regions.importance.Importance`
(same criteria, same file format), recording the step's batch size
(per-device batch × accumulation steps × processes). State (raw fp32 buffers and counters)
is written into each
checkpoint folder at ``on_save`` and read back at ``on_train_begin`` when training resumes, so a
resumed run ends with the same artefact as an uninterrupted one.

Distributed: under DDP every rank accumulates the same all-reduced gradients and rank 0 writes.
Under FSDP2 each rank accumulates its own ``Shard(0)`` slices; the buffers are gathered (a
collective on every rank) when saving.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lmeval_regions.artefacts import load_artefact, model_fingerprint, save_artefact
from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import (
    GRADIENT_CRITERIA,
    Importance,
    ImportanceAccumulator,
    ImportanceConfig,
)
from lmeval_regions.models.architecture import block_parameters
from lmeval_regions.models.module_map import matrix_layouts
from lmeval_regions.models.sharding import full_tensor, local_slice
from lmeval_regions.training.freeze import unwrap_model

STATE_NAME = "importance_callback_state.safetensors"
STATE_KIND = "importance_callback_state"
ARTEFACT_NAME = "importance.safetensors"


class ImportanceCallback(TrainerCallback):
    """Accumulate importance from each optimizer step's gradients.

    Args:
        config: one gradient criterion (``sum_abs`` default, ``abs_sum``, ``fisher``),
            parameters (``include``/``include_norms``) and accumulator dtype, as for
            :func:`~lmeval_regions.importance.compute_importance`.
        output: where to write the final artefact at ``on_train_end``
            (default ``<output_dir>/importance.safetensors``).
        before_clip: score the gradients before clipping (needs :meth:`attach`).
        languages: recorded in the artefact (e.g. the training language).
        resume_from: a checkpoint folder to read the state from when resuming (default
            ``<output_dir>/checkpoint-<global_step>``, the folder the Trainer resumes from).
    """

    def __init__(self, config: ImportanceConfig | None = None,
                 output: str | os.PathLike | None = None,
                 before_clip: bool = False, languages: list[str] | None = None,
                 resume_from: str | os.PathLike | None = None):
        if config is not None and not isinstance(config, ImportanceConfig):
            raise RegionsError(f"config must be an ImportanceConfig, got {type(config).__name__}")
        self.config = config or ImportanceConfig()
        crit = self.config.criteria
        if len(crit) != 1 or crit[0] not in GRADIENT_CRITERIA:
            raise RegionsError(f"ImportanceCallback accumulates one gradient criterion of "
                               f"{GRADIENT_CRITERIA}, got {crit}; compute 'magnitude'/'wanda' or "
                               "several criteria with importance.iter_importances")
        if self.config.snapshots:
            raise RegionsError(f"ImportanceCallback takes no snapshots (got "
                               f"{self.config.snapshots}); checkpoints already hold the "
                               "importance so far (importance.safetensors in each)")
        self.criterion = crit[0]
        self._batch_size: int | None = None
        self.output = output
        self.before_clip = bool(before_clip)
        self.languages = list(languages or [])
        self.resume_from = resume_from
        self.acc: ImportanceAccumulator | None = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self._clip_norm: float | None = None
        self._attached = False
        self._fingerprint: dict[str, Any] = {}
        self._layouts: dict[str, Any] = {}
        self.importance: Importance | None = None
        """The artefact written at the end of training."""

    # ---- optional pre-clip reading -----------------------------------------------------
    def attach(self, trainer) -> "ImportanceCallback":
        """Add this callback to ``trainer``; with ``before_clip``, also record the pre-clip
        gradient norm by wrapping this trainer instance's ``_clip_grad_norm``."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        if self.before_clip and not self._attached:
            original = trainer._clip_grad_norm

            def clip_and_record(model):
                norm = original(model)
                self._clip_norm = float(norm)
                return norm

            trainer._clip_grad_norm = clip_and_record
            self._attached = True
        return self

    # ---- events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.before_clip and not self._attached:
            raise RegionsError("ImportanceCallback(before_clip=True) needs "
                               "callback.attach(trainer) "
                               "so it can read the pre-clip gradient norm")
        model = unwrap_model(model)
        cfg = self.config
        self.params = block_parameters(model, cfg.include, cfg.include_norms)
        self._fingerprint = model_fingerprint(model)
        # logical q/k/v of fused weights, [in, out] storage: selection needs them later
        self._layouts = matrix_layouts(model, self.params)
        # The accumulator keeps FSDP2 shards local (buffers shaped like each rank's rows).
        self.acc = ImportanceAccumulator(self.params, self.criterion, cfg.dtype)
        per_device = getattr(args, "per_device_train_batch_size", None)  # None: not a Trainer's
        self._batch_size = None if per_device is None else (
            per_device * getattr(args, "gradient_accumulation_steps", 1)
            * getattr(args, "world_size", 1))
        if state.global_step > 0:
            self._load(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scale = 1.0
        if self.before_clip and args.max_grad_norm > 0 and self._clip_norm is not None:
            coef = min(1.0, args.max_grad_norm / (self._clip_norm + 1e-6))
            scale = 1.0 / coef if coef > 0 else math.inf
        # grads_finite() agrees across ranks under FSDP2 (it all-reduces the flag).
        if not (self.acc.grads_finite() and math.isfinite(scale)):
            self.acc.n_skipped += 1
            return
        self.acc.accumulate(check_finite=False, scale=scale)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        buffers, importance = self._gather(state)
        if state.is_world_process_zero:
            meta = {"criterion": self.acc.criterion, "n_batches": self.acc.n_batches,
                    "n_skipped": self.acc.n_skipped, "global_step": state.global_step}
            save_artefact(folder / STATE_NAME, buffers, STATE_KIND, meta)
            importance.save(folder / ARTEFACT_NAME)

    def on_train_end(self, args, state, control, **kwargs):
        _, importance = self._gather(state)
        if state.is_world_process_zero:
            importance.save(self.output or Path(args.output_dir) / ARTEFACT_NAME)
        self.importance = importance

    # ---- helpers -----------------------------------------------------------------------
    def _gather(self, state) -> tuple[dict[str, torch.Tensor], Importance]:
        """Full raw buffers and the Importance artefact (collective under FSDP2)."""
        buffers = {n: full_tensor(self.acc.buffers[n], p).cpu() for n, p in self.params.items()}
        scores = {n: b.float().abs() for n, b in buffers.items()}
        cfg = self.config
        importance = Importance(
            scores=scores, criterion=self.criterion, model=self._fingerprint,
            languages=self.languages,
            n_tokens=int(getattr(state, "num_input_tokens_seen", 0) or 0),
            n_skipped=self.acc.n_skipped,
            sources=[{"source": "trainer", "optimizer_steps": self.acc.n_batches,
                      "global_step": state.global_step}],
            extra={"include": list(cfg.include) if cfg.include else "blocks-2d",
                   "include_norms": cfg.include_norms, "accumulator_dtype": cfg.dtype,
                   "batch_size": self._batch_size,
                   "gradients": "before_clip" if self.before_clip else "after_clip",
                   **self._layouts},
        )
        return buffers, importance

    def _load(self, args, state) -> None:
        folder = Path(self.resume_from) if self.resume_from else (
            Path(args.output_dir) / f"checkpoint-{state.global_step}")
        path = folder / STATE_NAME
        if not path.is_file():
            raise RegionsError(f"resuming at step {state.global_step} but '{path}' does not exist; "
                               "pass ImportanceCallback(resume_from=<checkpoint folder>)")
        tensors, doc = load_artefact(path, STATE_KIND)
        if doc["global_step"] != state.global_step:
            raise RegionsError(f"'{path}' holds the importance state of step {doc['global_step']}, "
                               f"but training resumes at step {state.global_step}")
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise RegionsError(f"'{path}' lacks buffers for {missing[:3]}")
        self.acc.load_state_dict({
            "criterion": doc.get("criterion", doc.get("mode")), "n_batches": doc["n_batches"],
            "n_skipped": doc["n_skipped"],
            "buffers": {n: local_slice(tensors[n], p) for n, p in self.params.items()},
        })
