"""Importance over a corpus: :class:`ImportanceConfig`, one pass for every criterion
(:class:`ImportancePass`), cumulative snapshots, and the functions most callers use.

* :func:`compute_importance` -- one criterion over the whole corpus: one :class:`Importance`;
* :func:`iter_importances` -- several criteria and/or snapshots in ONE pass: yields one
  :class:`Importance` per criterion at each snapshot count, then per criterion for the whole
  corpus (``snapshot=None``);
* :class:`ImportancePass` -- the pass itself, for studies that merge passes over disjoint
  corpora (:class:`PassState` sums add).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from lmeval_regions.artefacts import model_fingerprint
from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.importance.accumulator import CRITERIA, GRADIENT_CRITERIA, ImportanceAccumulator
from lmeval_regions.importance.artefact import Importance
from lmeval_regions.importance.criteria import InputNorms, magnitude_scores
from lmeval_regions.models import parallel
from lmeval_regions.models.architecture import block_parameters
from lmeval_regions.models.module_map import matrix_layouts


@dataclass
class ImportanceConfig:
    """Which criteria to accumulate, over which parameters, with which snapshots."""

    criteria: tuple[str, ...] = ("sum_abs",)
    """Criteria computed together in one pass (one artefact each): ``sum_abs`` |θ·Σ_b g_b|
    (paper 1 Eq. 1-4 and its release: the default), ``abs_sum`` Σ_b |θ·g_b| (|·| per batch:
    its ranking changes with --batch-size), ``fisher`` Σ_b g_b² (also batch dependent),
    ``magnitude`` |θ| (ignores the corpus), ``wanda`` |W|·‖X‖ (input-feature L2 norm over the
    corpus' tokens; Linear/Conv1D weights only)."""
    snapshots: tuple[int, ...] = ()
    """Sequence counts at which cumulative snapshots are also written, in the same pass (paper 1
    compares 10K with 100K samples); each is taken after the first batch that reaches the
    count, as the release did (step ceil(count / batch size))."""
    include: tuple[str, ...] | None = None
    """Glob patterns of parameter names (``re:`` for regex); None = 2-D weights in blocks."""
    include_norms: bool = False
    """Also score 1-D norm weights inside blocks (paper 1's release kept them)."""
    dtype: Literal["float32", "bfloat16"] = field(default="float32",
                                                  metadata={"flag": "accumulator-dtype"})
    """Accumulator dtype: ``float32`` (default) or ``bfloat16`` (stochastic rounding, 7B scale)."""
    mode: InitVar[str | None] = None
    """Former name of a single criterion (``mode="abs_sum"``): sets ``criteria`` to it. Not a
    field (no flag); kept so code written before criteria existed still runs."""

    def __post_init__(self, mode: str | None) -> None:
        if mode is not None:
            if tuple(self.criteria) != ("sum_abs",):
                raise RegionsError(f"give either mode={mode!r} or criteria={self.criteria!r}, "
                                   "not both")
            self.criteria = (mode,)
        if isinstance(self.criteria, str):
            self.criteria = (self.criteria,)
        self.criteria = tuple(self.criteria)
        if not self.criteria:
            raise RegionsError(f"criteria is empty; expected some of {CRITERIA}")
        for c in self.criteria:
            if c not in CRITERIA:
                raise RegionsError(f"importance criterion '{c}' is not one of {CRITERIA}."
                                   + did_you_mean(str(c), CRITERIA))
        if len(set(self.criteria)) != len(self.criteria):
            raise RegionsError(f"criteria {self.criteria} name a criterion twice")
        snaps = []
        for s in self.snapshots:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise RegionsError(f"snapshot {s!r} is not a sequence count >= 1")
            snaps.append(s)
        if len(set(snaps)) != len(snaps):
            raise RegionsError(f"snapshots {tuple(self.snapshots)} repeat a count")
        self.snapshots = tuple(sorted(snaps))
        if self.dtype not in ("float32", "bfloat16"):
            raise RegionsError(f"accumulator dtype '{self.dtype}' is not 'float32' or 'bfloat16'")
        if self.include is not None:
            self.include = tuple(self.include)

    @property
    def gradient_criteria(self) -> tuple[str, ...]:
        return tuple(c for c in self.criteria if c in GRADIENT_CRITERIA)


@dataclass
class PassState:
    """Raw sums of a pass (or of several passes over disjoint corpora, added with ``+``);
    :meth:`ImportancePass.finish` turns them into scores."""

    grads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """criterion -> parameter name -> raw fp32 sum (signed for ``sum_abs``)."""
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    """parameter name -> fp64 Σ x² per input feature (``wanda``)."""
    n_sequences: int = 0
    """Sequences read."""
    n_tokens: int = 0
    """Predicted (scored) tokens read."""
    n_batches: int = 0
    """Batches read (skipped ones included)."""
    n_skipped: int = 0
    """Batches skipped because a gradient was not finite."""
    batch_size: int = 0
    """Largest number of sequences in one batch."""

    def __add__(self, other: "PassState") -> "PassState":
        if set(self.grads) != set(other.grads) or set(self.input_sq) != set(other.input_sq):
            raise RegionsError("cannot add pass states of different criteria or parameters")

        def add(a, b):
            return {n: a[n] + b[n] for n in a}

        return PassState(
            grads={c: add(self.grads[c], other.grads[c]) for c in self.grads},
            input_sq=add(self.input_sq, other.input_sq) if self.input_sq else {},
            n_sequences=self.n_sequences + other.n_sequences,
            n_tokens=self.n_tokens + other.n_tokens, n_batches=self.n_batches + other.n_batches,
            n_skipped=self.n_skipped + other.n_skipped,
            batch_size=max(self.batch_size, other.batch_size))


class ImportancePass:
    """One forward (and, for gradient criteria, one backward) per batch computing every
    criterion of ``config`` without changing any weight.

    Use as a context manager: inside, only included parameters require gradients, the model is
    in eval mode (no dropout) and Wanda's hooks are attached; all is restored on exit::

        with ImportancePass(model, config) as run:
            for batch in batches:
                run.step(batch)
            importances = run.finish(run.state())

    Each batch's loss is the model's mean token cross-entropy (labels -100 ignored); its
    gradient is taken once and feeds every gradient criterion. A batch whose gradients hold a
    non-finite value is skipped whole (all criteria) and counted.
    """

    def __init__(self, model: nn.Module, config: ImportanceConfig | None = None):
        self.model = model
        self.config = config = config or ImportanceConfig()
        self.params = block_parameters(model, config.include, config.include_norms)
        if not self.params:
            raise RegionsError(f"no parameter of {type(model).__name__} is included")
        self.fingerprint = model_fingerprint(model)
        self.layouts = matrix_layouts(model, self.params)
        self.accs = {c: ImportanceAccumulator(self.params, c, config.dtype)
                     for c in config.gradient_criteria}
        self.norms = InputNorms(model, self.params) if "wanda" in config.criteria else None
        self.device = next(iter(self.params.values())).device
        self._saved: dict[str, bool] | None = None
        self._was_training = False
        self.reset()

    # ---- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "ImportancePass":
        self._was_training = self.model.training
        self._saved = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.eval()  # no dropout: importance of the model as it is
        ids = {id(p) for p in self.params.values()} if self.accs else set()
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        if self.norms is not None:
            self.norms.attach()
        return self

    def __exit__(self, *exc) -> None:
        if self.norms is not None:
            self.norms.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._saved[n])
            p.grad = None
        self.model.train(self._was_training)

    def reset(self) -> None:
        """Zero every sum and counter (the next batches start a new corpus)."""
        for acc in self.accs.values():
            for b in acc.buffers.values():
                b.zero_()
            acc.n_batches = acc.n_skipped = 0
        if self.norms is not None:
            self.norms.sums = {}
        self.n_sequences = self.n_tokens = self.n_batches = self.n_skipped = self.batch_size = 0

    # ---- one batch ---------------------------------------------------------------------
    def step(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Forward (and backward) one batch with ``input_ids``, ``attention_mask``, ``labels``."""
        if self._saved is None:
            raise RegionsError("ImportancePass.step() must run inside `with ImportancePass(...)`")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.norms is not None:
            self.norms.begin(batch.get("attention_mask"))
        if self.accs:
            self.model(**batch).loss.backward()
            accs = list(self.accs.values())
            ok = accs[0].grads_finite()  # one check (and one collective under FSDP2) for all
            for acc in accs:
                if ok:
                    acc.accumulate(check_finite=False)
                else:
                    acc.skip()
            for p in self.params.values():
                p.grad = None
            self.n_skipped += int(not ok)
            if ok and self.norms is not None:
                self.norms.commit()
        elif self.norms is not None:
            with torch.no_grad():
                self.model(**batch)
            self.norms.commit()
        rows = int(batch["input_ids"].shape[0])
        self.n_sequences += rows
        self.batch_size = max(self.batch_size, rows)
        self.n_batches += 1
        labels = batch.get("labels", batch["input_ids"])
        self.n_tokens += int((labels[:, 1:] != -100).sum())

    # ---- results -----------------------------------------------------------------------
    def state(self, copy: bool = True) -> PassState:
        """The raw sums so far (fp32 copies unless ``copy=False``, which shares the live
        buffers and is only good until the next :meth:`step`)."""
        grads = {c: (acc.raw() if copy else {n: b for n, b in acc.buffers.items()})
                 for c, acc in self.accs.items()}
        sq = self.norms.sums if self.norms is not None else {}
        return PassState(grads=grads, input_sq={n: t.clone() if copy else t for n, t in sq.items()},
                         n_sequences=self.n_sequences, n_tokens=self.n_tokens,
                         n_batches=self.n_batches, n_skipped=self.n_skipped,
                         batch_size=self.batch_size)

    def finish(self, state: PassState, snapshot: int | None = None,
               languages: list[str] | None = None, sources: list[dict[str, Any]] | None = None,
               take: bool = False) -> list[Importance]:
        """One :class:`Importance` per criterion (config order) from ``state``; new tensors,
        unless ``take``: then the sums of ``state`` become the scores (|·| in place), which
        saves a copy when the pass is over. Gradient criteria's scores have the sums' dtype:
        fp32, or bf16 from bf16 accumulators in one process (their exact values; selection
        ranks them as stored and :func:`combine` adds them in fp32).

        ``magnitude`` and ``wanda`` read the weights as they are now.
        """
        cfg = self.config
        extra = {"include": list(cfg.include) if cfg.include else "blocks-2d",
                 "include_norms": cfg.include_norms, "accumulator_dtype": cfg.dtype,
                 "batch_size": state.batch_size, "n_batches": state.n_batches,
                 # logical q/k/v (gate/up) of fused weights, [in, out] storage: per-matrix
                 # selection from this file needs them and has no model
                 **self.layouts}
        out = []
        for c in cfg.criteria:
            if c in GRADIENT_CRITERIA:
                raw = state.grads[c]
                # |.| keeps the sums' dtype: fp32, or the bf16 accumulators' own (exact)
                # values -- widening them would add no information and 4 bytes per entry
                scores = {n: raw[n].abs_() if take else raw[n].abs() for n in self.params}
            elif c == "magnitude":
                scores = magnitude_scores(self.params)
            else:
                scores = self.norms.scores(self.params, state.input_sq)
            out.append(Importance(
                scores=scores, criterion=c, model=self.fingerprint,
                languages=list(languages or []), n_sequences=state.n_sequences,
                n_tokens=state.n_tokens, n_skipped=state.n_skipped,
                sources=list(sources or []), snapshot=snapshot, extra=dict(extra)))
        return out


def _count_sequences(batches: Iterable[Mapping[str, torch.Tensor]]) -> int | None:
    """Sequences in ``batches`` when it is a sequence (known before the pass), else None."""
    if isinstance(batches, Sequence):
        return sum(int(b["input_ids"].shape[0]) for b in batches)
    return None


def _ranks(model: nn.Module, data_parallel: bool | None) -> parallel.DataParallel | None:
    """The data-parallel ranks to deal ``batches`` to (None: this process alone)."""
    if data_parallel is False:
        return None
    dp = parallel.data_parallel(model)
    if data_parallel and dp is None:
        raise RegionsError("data_parallel=True needs a process group of more than one process "
                           "and a model of plain tensors (FSDP2 shards: each rank passes its "
                           "own batches, see importance.shards)")
    return dp


def _all_reduce_state(state: PassState, device: torch.device, digest: parallel.BatchDigest
                      ) -> None:
    """Sum fp32 ``state`` over the data-parallel ranks, in place; every rank calls it at the
    same global batch."""
    digest.check(device)  # first: ranks given different corpora fail together, none hangs
    counts = torch.tensor([state.n_sequences, state.n_tokens, state.n_batches, state.n_skipped],
                          dtype=torch.int64, device=device)
    size = torch.tensor([state.batch_size], dtype=torch.int64, device=device)
    parallel.all_reduce_(counts)
    parallel.all_reduce_(size, "max")
    # sum_abs: the SIGNED sums are added (|·| comes after, in finish); abs_sum, fisher: sums of
    # per-batch terms; wanda: Σ x² per input feature
    for sums in [*state.grads.values(), state.input_sq]:
        for t in sums.values():
            parallel.all_reduce_(t)
    state.n_sequences, state.n_tokens, state.n_batches, state.n_skipped = counts.tolist()
    state.batch_size = int(size)


def _summed_state(run: ImportancePass, dp: parallel.DataParallel | None,
                  digest: parallel.BatchDigest | None, final: bool) -> tuple[PassState, bool]:
    """``(state over every rank's batches, whether finish may take its tensors)``. One process:
    the live sums (taken once the pass is over). Data parallel: fp32 sums added over the ranks
    (copies for a snapshot; at the end the fp32 buffers themselves, bf16 ones widened)."""
    if dp is None:
        return run.state(copy=False), final
    state = run.state(copy=not final)
    state.grads = {c: {n: t.float() for n, t in g.items()} for c, g in state.grads.items()}
    _all_reduce_state(state, run.device, digest)
    return state, True


def iter_importances(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: ImportanceConfig | None = None,
    languages: list[str] | None = None,
    sources: list[dict[str, Any]] | None = None,
    progress: bool = True,
    data_parallel: bool | None = None,
) -> Iterator[Importance]:
    """Every criterion of ``config``, at each snapshot count and over the whole corpus, in ONE
    pass over ``batches``.

    Yields, in order: for each snapshot count (ascending), one :class:`Importance` per criterion
    with ``snapshot=count``, as soon as the first batch reaching that many sequences is done;
    then one per criterion over the whole corpus (``snapshot=None``). Snapshots are cumulative
    (the corpus' first sequences), identical to a separate run over the same prefix of batches.
    While the generator is suspended the model is in eval mode with only included parameters
    requiring gradients (restored when it finishes or is closed).

    ``data_parallel`` (None: when a process group of several processes exists and ``model``
    holds plain tensors, :func:`models.data_parallel`): every rank passes the *whole* corpus,
    the same ``batches``; batch ``i`` is computed by rank ``i % world_size`` (round-robin,
    :mod:`models.parallel`), and at each snapshot and at the end the ranks' sums are added by
    all_reduce, so every rank yields the importance of the whole corpus, equal to one process'
    up to float summation order (fp32 accumulators; bf16 ones round stochastically per rank).
    Ranks given different batches are refused. ``False``: each rank scores what it is given.
    """
    from tqdm.auto import tqdm

    config = config or ImportanceConfig()
    dp = _ranks(model, data_parallel)
    total = _count_sequences(batches)
    if total is not None and config.snapshots and config.snapshots[-1] > total:
        raise RegionsError(f"snapshot at {config.snapshots[-1]} sequences, but the corpus has "
                           f"{total}; expected counts <= {total}")
    pending = list(config.snapshots)
    digest = parallel.BatchDigest() if dp is not None else None
    seen = 0  # sequences of the corpus so far, on every rank (the snapshot clock)
    shown = progress and (dp is None or dp.main)
    extra = {} if dp is None else {"data_parallel": {"world_size": dp.world_size,
                                                     "dealing": "round-robin"}}

    def finish(snapshot: int | None) -> list[Importance]:
        state, take = _summed_state(run, dp, digest, final=snapshot is None)
        if snapshot is None and pending:
            raise RegionsError(f"snapshots {pending} were not reached: the corpus has {seen} "
                               "sequences")
        out = run.finish(state, snapshot, languages, sources, take)
        for imp in out:
            imp.extra.update(extra)
        return out

    with ImportancePass(model, config) as run:
        for i, batch in enumerate(tqdm(batches, desc="importance", unit="batch",
                                       disable=not shown)):
            if dp is None or dp.mine(i):
                run.step(batch)
            if digest is not None:
                digest.update(batch)
            seen += int(batch["input_ids"].shape[0])
            while pending and seen >= pending[0]:
                yield from finish(pending.pop(0))
        yield from finish(None)


def compute_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: ImportanceConfig | None = None,
    languages: list[str] | None = None,
    sources: list[dict[str, Any]] | None = None,
    progress: bool = True,
    data_parallel: bool | None = None,
) -> Importance:
    """Importance of one criterion over ``batches`` (dicts with ``input_ids``,
    ``attention_mask``, ``labels``; labels -100 are ignored) without changing any weight.

    The default criterion is paper 1's ``sum_abs``. Only included parameters get gradients
    (others are frozen for the duration), which keeps memory to the accumulators plus the
    included parameters' gradients. For several criteria or snapshots use
    :func:`iter_importances` (which also explains ``data_parallel``).
    """
    config = config or ImportanceConfig()
    if len(config.criteria) != 1 or config.snapshots:
        raise RegionsError(f"compute_importance() returns one artefact, but the config asks for "
                           f"criteria {config.criteria} and snapshots {config.snapshots}: use "
                           "iter_importances()")
    *_, final = iter_importances(model, batches, config, languages, sources, progress,
                                 data_parallel)
    return final
