"""Accumulating per-parameter gradient criteria, without updating the model.

g_b is the gradient of batch b's mean token loss. Gradient criteria (one buffer each):

``sum_abs``  I = |Σ_b θ_b ⊙ g_b|   paper 1 Eq. 1-4 and its release (the default): the loss of
                                    the whole corpus, L(D) = Σ_b L_b, scores a parameter by
                                    |θ ⊙ ∇L(D)| = |θ ⊙ Σ_b g_b| when θ is fixed; the release
                                    summed gradients over all micro-batches without stepping
                                    and took |·| once at extraction. Independent of how the
                                    corpus is cut into batches (up to float rounding).
``abs_sum``  I = Σ_b |θ_b ⊙ g_b|   the absolute value taken per batch, then summed: a
                                    different estimator (≥ sum_abs), and its ranking changes
                                    with the batch size.
``fisher``   I = Σ_b g_b ⊙ g_b     empirical Fisher diagonal of the batch-mean-loss gradients
                                    (also batch-size dependent).

``magnitude`` (|θ|) and ``wanda`` (|W|·‖X‖, forward hooks) need no gradient buffer: see
:mod:`.criteria`. The Trainer callback (``trainer_ext``) uses the same accumulator on each
optimizer step's gradients (θ_b is then the weight before step b).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import nn

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.sharding import local

Criterion = Literal["sum_abs", "abs_sum", "fisher", "magnitude", "wanda"]
CRITERIA: tuple[str, ...] = ("sum_abs", "abs_sum", "fisher", "magnitude", "wanda")
"""Every importance criterion, the paper's (``sum_abs``) first."""
GRADIENT_CRITERIA: tuple[str, ...] = ("sum_abs", "abs_sum", "fisher")
"""Criteria accumulated from gradients (one backward per batch serves all of them)."""


def add_stochastic_bf16(acc: torch.Tensor, x: torch.Tensor, gen: torch.Generator | None) -> None:
    """acc(bf16) += x(fp32) with stochastic rounding (SR).

    The exact fp32 sum s = acc + x is rounded to one of its two bf16 neighbours, up with
    probability equal to its distance from the lower one in units of the bf16 spacing u(s):
    adding 16 uniform random bits below the kept 16 and truncating does exactly that, for either
    sign (bf16 is sign-magnitude, truncation rounds the magnitude down). Hence E[error] = 0 and
    |error| < u(s) <= 2^-7 |s| per add. Errors of successive adds are zero-mean given the past
    (a martingale), so after n adds the accumulated error has mean 0 and standard deviation
    <= 2^-8 * sqrt(sum_i s_i^2) <= 2^-8 * sqrt(n) * max_i |s_i|; for ``abs_sum`` (non-negative
    addends, partial sums growing) that is a relative std <= 2^-8 * sqrt(n) of the final score,
    and about 2^-8 * sqrt(n / 3) for addends of similar size. Round-to-nearest would instead
    stall once an addend falls below half a bf16 spacing of the sum (a systematic loss).
    """
    s = acc.float().add_(x)
    bits = s.view(torch.int32)
    noise = torch.randint(0, 1 << 16, s.shape, dtype=torch.int32, device=s.device, generator=gen)
    bits.add_(noise).bitwise_and_(-65536)  # add random low bits, then truncate to bf16
    acc.copy_(s)


class ImportanceAccumulator:
    """Adds θ⊙g (``sum_abs``), |θ⊙g| (``abs_sum``) or g⊙g (``fisher``) of the current gradients
    into per-parameter buffers.

    Call :meth:`accumulate` after each backward pass (or optimizer step's gradients). A batch
    whose gradients contain a non-finite value anywhere is skipped whole and counted.
    Memory: one buffer per included parameter (4 bytes per entry in fp32, 2 in bf16) and one
    reused fp32 work buffer the size of the largest parameter (``abs_sum`` only).
    """

    def __init__(
        self, params: Mapping[str, nn.Parameter], criterion: Criterion = "sum_abs",
        dtype: str = "float32", seed: int = 0,
    ):
        if criterion not in GRADIENT_CRITERIA:
            raise RegionsError(f"gradient criterion '{criterion}' is not one of "
                               f"{GRADIENT_CRITERIA}")
        self.params = dict(params)
        self.criterion = criterion
        self.dtype = getattr(torch, dtype)
        # Under FSDP2 a parameter is a DTensor sharded on dim 0: accumulate this rank's rows.
        self.buffers = {
            n: torch.zeros(local(p).shape, dtype=self.dtype, device=p.device)
            for n, p in self.params.items()
        }
        self._sharded = any(local(p) is not p for p in self.params.values())
        self.n_batches = 0
        self.n_skipped = 0
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._gen = None
        if self.dtype == torch.bfloat16:
            self._gen = torch.Generator(
                device=next(iter(self.params.values())).device).manual_seed(seed)

    def grads_finite(self) -> bool:
        """All gradients finite; with sharded parameters, on every rank (so all skip alike)."""
        grads = [local(p.grad) for p in self.params.values() if p.grad is not None]
        ok = True
        if grads:
            # One fused reduction and one host sync. The L2 norm is ~15x faster on CPU than
            # the inf-norm and is non-finite whenever an entry is; only then (or when the sum
            # of squares overflows) is the exact per-tensor check run.
            norms = torch._foreach_norm(grads)
            ok = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
            if not ok:
                ok = all(bool(torch.isfinite(g).all()) for g in grads)
        if self._sharded:
            import torch.distributed as dist

            flag = torch.tensor([int(ok)], device=next(iter(self.buffers.values())).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    def _scratch_for(self, p: torch.Tensor) -> torch.Tensor:
        """A reused fp32 work buffer with ``p``'s shape (one per device, sized for the largest
        parameter), so accumulation allocates nothing per batch."""
        buf = self._scratch.get(p.device)
        if buf is None:
            size = max(q.numel() for q in self.params.values() if q.device == p.device)
            buf = self._scratch[p.device] = torch.empty(size, dtype=torch.float32, device=p.device)
        return buf[: p.numel()].view(p.shape)

    @torch.no_grad()
    def accumulate(self, check_finite: bool = True, scale: float = 1.0) -> bool:
        """Add this batch's contribution; False (and counted) when skipped as non-finite.

        ``scale`` (> 0) multiplies the gradient before it is used (so g⊙g by ``scale**2``):
        the Trainer callback passes 1/clip-coefficient to score gradients as they were before
        clipping."""
        if check_finite and not self.grads_finite():
            self.n_skipped += 1
            return False
        fisher = self.criterion == "fisher"
        if fisher:
            scale = scale * scale
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            buf = self.buffers[name]
            g = local(g)  # FSDP2: this rank's rows
            theta = g if fisher else local(p.detach())
            # Fast path (plain fp32 tensors): fused ops into reused memory, no temporaries.
            if (buf.dtype == theta.dtype == g.dtype == torch.float32
                    and type(theta) is torch.Tensor and type(g) is torch.Tensor):
                if self.criterion == "abs_sum":
                    tmp = self._scratch_for(theta)
                    torch.mul(theta, g, out=tmp)
                    buf.add_(tmp.abs_(), alpha=scale)
                else:  # sum_abs: θ⊙g, fisher: g⊙g (signed sum; |·| at result())
                    buf.addcmul_(theta, g, value=scale)
                continue
            prod = torch.mul(theta, g)  # bf16/fp16 models, DTensor shards
            if prod.dtype != torch.float32:
                prod = prod.float()
            if scale != 1.0:
                prod.mul_(scale)
            if self.criterion == "abs_sum":
                prod.abs_()
            if buf.dtype == torch.float32:
                buf.add_(prod)
            else:
                add_stochastic_bf16(buf, prod, self._gen)
        self.n_batches += 1
        return True

    def skip(self) -> None:
        """Count a batch skipped by a caller that checked :meth:`grads_finite` itself."""
        self.n_skipped += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The scores: new fp32 tensors, absolute values (``sum_abs`` takes |·| here)."""
        return {n: b.float().abs() for n, b in self.buffers.items()}

    def raw(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the raw buffers (signed for ``sum_abs``): sums over disjoint corpora
        add, so two passes' raw sums give the sum over both corpora."""
        return {n: b.float().clone() for n, b in self.buffers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": self.buffers, "n_batches": self.n_batches, "n_skipped": self.n_skipped,
                "criterion": self.criterion}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("criterion", state.get("mode"))  # "mode": states written before criteria
        if saved != self.criterion:
            raise RegionsError(f"saved accumulator criterion '{saved}' != '{self.criterion}'")
        for n, b in state["buffers"].items():
            if n not in self.buffers:
                raise RegionsError(f"saved accumulator has unknown parameter '{n}'")
            self.buffers[n].copy_(b)
        self.n_batches, self.n_skipped = int(state["n_batches"]), int(state["n_skipped"])
