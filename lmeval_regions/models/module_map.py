"""A map of each decoder block's projections and norms, found by module structure.

For every block: the attention input projections q/k/v (separate, or rows of one fused
projection), the attention output projection o, the MLP up (and gate) and down projections, and
the block's norms. Nothing here branches on the model's name:

* the MLP is the parent of the down projection that :func:`architecture.find_layout` finds; its
  other linear layers map hidden -> intermediate: two of them are gate and up (the one whose
  attribute name contains ``gate`` is gate), one is up -- or one fused gate/up of twice the
  intermediate width (Phi-3's ``gate_up_proj``: ``[gate | up]``, checked by running it);
* the attention module is the block's other child holding linear layers; o is the one mapping
  heads -> hidden (with one fused input projection: the one whose output is hidden; with three
  named q/k/v projections: the unnamed one; else the last in definition order); the others are
  q/k/v, labelled by the letter their attribute name ends with (``q_proj``, ``query``...) or
  else by order;
* one fused input projection (BLOOM/GPT-NeoX ``query_key_value``, GPT-2 ``c_attn``, Phi-3
  ``qkv_proj``) is split into q/k/v rows using the config's head counts. Its row layout is
  *measured*: a one-token forward pass in which the fused output is replaced by marker bits
  shows, at the input of o, which fused row feeds each value channel (one token attends only to
  itself, so o's input is v exactly); the layout whose v rows match is taken -- ``per_head``
  (per kv head ``[q_1 .. q_r | k | v]``: BLOOM, GPT-NeoX, Falcon) or ``concatenated``
  (``[q .. | k .. | v ..]``: GPT-2, Phi-3) -- and a fused projection matching neither is refused;
* norms are the block's modules with a 1-D ``weight`` of hidden size (plus per-head norms such as
  Gemma3's ``q_norm``); whether a norm scales by ``w`` or by ``1 + w`` (Gemma) is *measured* by
  running it, so "reset to 1" means an effective scale of 1 on every architecture.

Weights are torch ``[out, in]`` (``nn.Linear``) or ``[in, out]`` (GPT-2's ``Conv1D``:
``transposed``). Each :class:`Projection` exposes a logical ``[out_l, in]`` view (``rows`` picks
a fused projection's outputs) and says which side is the residual (hidden) dimension, so every
dimension function works in logical orientation whatever the storage.

:func:`check_module_map` runs the structural part on a model built on the meta device (no
weights, milliseconds; see :func:`models.meta_model`), so a command can refuse an architecture
before loading it; only the measured fused layout is left for after the load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from lmeval_regions.errors import RegionsError, did_you_mean
from lmeval_regions.models.architecture import find_layout, linear_shape, text_config

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Which side of each projection is the residual stream ("hidden"); the other side is an attention
# head feature (q/k/v out, o in) or an MLP neuron (up/gate out, down in).
HIDDEN_SIDE = {"q": "in", "k": "in", "v": "in", "o": "out", "gate": "in", "up": "in", "down": "out"}
FUSED_QKV = ("auto", "per_head", "concatenated")
MAP_NEEDS = ("projections", "norms")


@dataclass
class Projection:
    """One logical projection matrix inside a block.

    Attributes:
        role: one of ``q, k, v, o, gate, up, down``.
        param: full name of the torch weight.
        shape: that weight's stored shape: ``[out, in]``, or ``[in, out]`` when ``transposed``.
        rows: the weight's output indices that make up this projection (``None`` = all); for a
            fused q/k/v these are the q (or k, v) outputs, in head order, so logical out index
            ``i`` is stored output ``rows[i]`` (a torch row, or a column when ``transposed``).
        transposed: the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    role: str
    param: str
    shape: list[int]
    rows: torch.Tensor | None = None
    transposed: bool = False

    @property
    def out_axis(self) -> int:
        """The stored weight's dimension that indexes outputs (1 for a ``Conv1D``)."""
        return 1 if self.transposed else 0

    @property
    def out_size(self) -> int:
        return self.shape[self.out_axis] if self.rows is None else int(self.rows.numel())

    @property
    def in_size(self) -> int:
        return self.shape[1 - self.out_axis]

    @property
    def hidden_side(self) -> str:
        return HIDDEN_SIDE[self.role]

    def size(self, side: str) -> int:
        return self.out_size if side == "out" else self.in_size

    def torch_rows(self) -> torch.Tensor:
        """Stored output indices of the logical rows (``[out_l]``, int64)."""
        return torch.arange(self.shape[self.out_axis]) if self.rows is None else self.rows

    def logical(self, full: torch.Tensor) -> torch.Tensor:
        """The logical ``[out_l, in]`` view of a tensor shaped like the stored weight."""
        if self.transposed:
            full = full.t()
        return full if self.rows is None else full[self.rows]

    def flat_indices(self, side: str, dims: torch.Tensor) -> torch.Tensor:
        """Flat indices into the stored weight of logical ``dims`` on ``side`` (sorted, int64).

        ``out`` dims are whole logical rows; ``in`` dims are columns restricted to this
        projection's rows (a fused q's column ``j`` does not touch k's or v's rows).
        """
        dims = dims.long()
        if side == "out":
            outs, ins = self.torch_rows()[dims], torch.arange(self.in_size)
        elif side == "in":
            outs, ins = self.torch_rows(), dims
        else:
            raise RegionsError(f"side '{side}' is not 'in' or 'out'")
        if self.transposed:  # stored [in, out]: entry (o, i) is at i * n_out + o
            idx = ins[None, :] * self.shape[1] + outs[:, None]
        else:
            idx = outs[:, None] * self.shape[1] + ins[None, :]
        return torch.sort(idx.reshape(-1)).values


@dataclass
class Norm:
    """A norm inside a block. ``offset`` is 1 where the module scales by ``1 + weight``."""

    name: str
    """Full parameter name of the weight (1-D)."""
    size: int
    offset: float = 0.0

    def effective(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.offset

    def raw(self, effective: torch.Tensor | float):
        """Weight value that gives the ``effective`` scale."""
        return effective - self.offset


@dataclass
class BlockMap:
    index: int
    projections: dict[str, Projection] = field(default_factory=dict)
    norms: list[Norm] = field(default_factory=list)


@dataclass
class ModuleMap:
    """Per-block projections and norms of a model (see the module docstring)."""

    blocks: list[BlockMap]
    hidden_size: int
    intermediate_size: int

    def projections(self, roles=ROLES) -> list[Projection]:
        return [b.projections[r] for b in self.blocks for r in roles if r in b.projections]

    def norm(self, layer: int, which: str = "input") -> Norm:
        """A block's norm: ``input`` (the first hidden-size norm), or a name suffix such as
        ``post_attention_layernorm``."""
        norms = self.blocks[layer].norms
        if which == "input":
            hid = [n for n in norms if n.size == self.hidden_size]
            if hid:
                return hid[0]
        for n in norms:
            if n.name.rsplit(".", 1)[0].endswith(which):
                return n
        raise RegionsError(f"block {layer} has no norm '{which}'; it has "
                           f"{[n.name for n in norms]}")


def _label(sub: str) -> str | None:
    last = sub.rsplit(".", 1)[-1].lower()
    for tag, role in (("query", "q"), ("key", "k"), ("value", "v")):
        if tag in last:
            return role
    stem = last.split("_")[0]
    return stem if stem in ("q", "k", "v") else None


@torch.no_grad()
def _norm_offset(m: nn.Module, size: int) -> float:
    """Measure g(0) where the norm computes x_hat * g(w) + b with g(w) = w or 1 + w."""
    w = m.weight
    saved = w.detach().clone()
    x = torch.randn(1, size, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        w.zero_()
        f0, f0n = m(x), m(-x)
        w.fill_(1.0)
        f1 = m(x)
    finally:
        w.copy_(saved)
    x_hat = (f1 - f0).float()
    g0 = ((f0 - f0n).float() / 2)
    denom = float((x_hat * x_hat).sum())
    return round(float((g0 * x_hat).sum()) / denom) if denom else 0.0


# ---- fused q/k/v layouts -------------------------------------------------------------------

def qkv_rows(layout: str, n_heads: int, n_kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Rows of q, k and v (each in head order, ``[heads x head_dim]``) in a fused projection.

    ``per_head``: per kv head ``g`` a block ``[q of its r = heads/kv heads query heads | k | v]``
    (with as many kv heads as heads: BLOOM's and GPT-NeoX's per-head ``[q | k | v]``);
    ``concatenated``: ``[all q | all k | all v]``.
    """
    hd = head_dim
    if n_kv < 1 or n_heads % n_kv:
        raise RegionsError(f"{n_heads} attention heads are not a multiple of {n_kv} kv heads")
    r = n_heads // n_kv
    d = torch.arange(hd)
    if layout == "per_head":
        g = torch.arange(n_kv)[:, None, None] * (r + 2) * hd
        q = (g + torch.arange(r)[None, :, None] * hd + d).reshape(-1)
        k = (torch.arange(n_kv)[:, None] * (r + 2) * hd + r * hd + d).reshape(-1)
        return {"q": q, "k": k, "v": k + hd}
    if layout == "concatenated":
        nq, nk = n_heads * hd, n_kv * hd
        return {"q": torch.arange(nq), "k": torch.arange(nq, nq + nk),
                "v": torch.arange(nq + nk, nq + 2 * nk)}
    raise RegionsError(f"fused q/k/v layout '{layout}' is not one of {FUSED_QKV[1:]}")


def _output_shape(m: nn.Module) -> int:
    return linear_shape(m)[1]


@torch.no_grad()
def _one_token(model: nn.Module, replace: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]],
               capture: Iterable[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Run one token through ``model`` with each ``replace`` module's output swapped for
    ``fn(output)``; returns the last-position input of each ``capture`` module (fp32, 1-D)."""
    got: dict[nn.Module, torch.Tensor] = {}
    handles = []
    for m, fn in replace.items():
        handles.append(m.register_forward_hook(lambda _m, _a, out, fn=fn: fn(out)))
    for m in capture:
        handles.append(m.register_forward_pre_hook(
            lambda mod, args: got.__setitem__(mod, args[0].reshape(-1, args[0].shape[-1])[-1]
                                              .detach().float().cpu())))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would break the exact copy of v into o's input
    try:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return got


def _bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def _measure_qkv(model: nn.Module, fused: list[tuple[nn.Module, nn.Module, str]],
                 n_heads: int, n_kv: int, hd: int) -> dict[nn.Module, str]:
    """The layout of each fused projection (``(fused, o, name)``), from the fused row that
    feeds each value channel, read at o's input (see the module docstring)."""
    n_rows = max(_output_shape(f) for f, _, _ in fused)
    found: dict[nn.Module, torch.Tensor] = {}
    for b in range(_bits(n_rows)):
        def marker(out, b=b):
            idx = torch.arange(out.shape[-1], device=out.device)
            return ((idx >> b) & 1).to(out.dtype).expand_as(out).clone()
        seen = _one_token(model, {f: marker for f, _, _ in fused}, [o for _, o, _ in fused])
        for f, o, name in fused:
            x = seen.get(o)
            if x is None or not bool(((x == 0) | (x == 1)).all()):
                raise RegionsError(f"cannot measure the q/k/v layout of fused projection '{name}': "
                                   "the attention output is not a copy of the value rows for one "
                                   "token; pass fused_qkv='per_head' or 'concatenated'")
            found[f] = found.get(f, 0) + (x.long() << b)  # fused row index, bit by bit
    out = {}
    r = n_heads // max(n_kv, 1)
    head_of = torch.arange(n_heads * hd) // hd // max(r, 1)  # kv head of each o input
    for f, _, name in fused:
        v_rows = found[f]
        for layout in FUSED_QKV[1:]:
            v = qkv_rows(layout, n_heads, n_kv, hd)["v"].view(n_kv, hd)
            if torch.equal(v[head_of, torch.arange(n_heads * hd) % hd], v_rows):
                out[f] = layout
                break
        else:
            raise RegionsError(
                f"fused projection '{name}': its value channels come from rows "
                f"{v_rows[:8].tolist()}..., which match neither a per-head nor a concatenated "
                f"q/k/v layout ({n_heads} heads, {n_kv} kv heads, head_dim {hd}); its q/k/v split "
                "is unknown, so per-q/k/v operations refuse it")
    return out


@torch.no_grad()
def _check_gate_up(model: nn.Module, fused: list[tuple[nn.Module, nn.Module, str]]) -> None:
    """Check that fused gate/up projections are ``[gate | up]``: with the second half doubled
    the down projection's input doubles (up is linear), with the first half doubled it does not
    (the activation is not)."""
    def fill(a, b):
        def fn(out):
            half = out.shape[-1] // 2
            x = torch.empty_like(out)
            x[..., :half], x[..., half:] = a, b
            return x
        return fn
    runs = [_one_token(model, {f: fill(a, b) for f, _, _ in fused}, [d for _, d, _ in fused])
            for a, b in ((1.0, 1.0), (1.0, 2.0), (2.0, 1.0))]
    for f, d, name in fused:
        base, up2, gate2 = (r[d] for r in runs)
        if not (torch.allclose(up2, 2 * base) and not torch.allclose(gate2, 2 * base)):
            raise RegionsError(f"fused gate/up projection '{name}' is not [gate | up] (the down "
                               "input is not linear in its second half alone); its split is "
                               "unknown")


# ---- the map -------------------------------------------------------------------------------

def _attention_parts(attn: list[tuple[str, nn.Module]], hidden: int, prefix: str):
    """``(o, inputs)`` among a block's attention linears (see the module docstring)."""
    if len(attn) == 2:
        is_o = [linear_shape(m)[1] == hidden for _, m in attn]
        if is_o.count(True) == 1:
            j = is_o.index(True)
            return attn[j], [attn[1 - j]]
    if len(attn) == 4:
        labels = [_label(s) for s, _ in attn]
        if sorted(l for l in labels if l) == ["k", "q", "v"]:
            j = labels.index(None)
            return attn[j], attn[:j] + attn[j + 1:]
    if len(attn) < 2:
        raise RegionsError(f"block {prefix}: expected attention projections, found "
                           f"{[s for s, _ in attn]}")
    return attn[-1], attn[:-1]


def _heads(cfg) -> tuple[int, int]:
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_heads:
        raise RegionsError(f"cannot read the number of attention heads from {type(cfg).__name__}")
    n_kv = (getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None)
            or n_heads)
    return int(n_heads), int(n_kv)


def _build(model: nn.Module, fused_qkv: str = "auto", projections: bool = True,
           measure_norms: bool = True, probe: bool = True) -> ModuleMap:
    """The map; ``probe=False`` skips every forward pass (a meta-device model): fused layouts
    default to ``per_head`` there and are not measured, so only the structure is checked."""
    if fused_qkv not in FUSED_QKV:
        raise RegionsError(f"fused_qkv '{fused_qkv}' is not one of {FUSED_QKV}."
                           + did_you_mean(str(fused_qkv), FUSED_QKV))
    layout = find_layout(model)
    cfg = text_config(model)
    hidden, inter = layout.hidden_size, layout.intermediate_size
    modules = dict(model.named_modules())
    blocks, fused, gate_ups = [], [], []
    for i in range(layout.num_layers):
        prefix = layout.block(i)
        block = modules[prefix]
        bm = BlockMap(i)
        blocks.append(bm)
        for s, m in block.named_modules():
            w = getattr(m, "weight", None)
            if s and w is not None and w.dim() == 1 and not linear_shape(m):
                off = _norm_offset(m, w.numel()) if measure_norms else 0.0
                bm.norms.append(Norm(f"{prefix}.{s}.weight", w.numel(), off))
        if not projections:
            continue

        def proj(role, s, m, rows=None):
            return Projection(role, f"{prefix}.{s}.weight", list(m.weight.shape), rows,
                              transposed=type(m).__name__ == "Conv1D")

        down_sub = layout.down_proj[i][len(prefix) + 1:]
        mlp_sub = down_sub.rsplit(".", 1)[0] if "." in down_sub else ""
        linears = [(s, m) for s, m in block.named_modules() if linear_shape(m)]
        mlp = [(s, m) for s, m in linears if mlp_sub and s.startswith(mlp_sub + ".")]
        attn = [(s, m) for s, m in linears if (s, m) not in mlp]
        bm.projections["down"] = proj("down", down_sub, modules[layout.down_proj[i]])
        ups = [(s, m) for s, m in mlp if s != down_sub]
        if len(ups) == 1 and linear_shape(ups[0][1])[1] == 2 * inter:
            s, m = ups[0]  # fused [gate | up]
            bm.projections["gate"] = proj("gate", s, m, torch.arange(inter))
            bm.projections["up"] = proj("up", s, m, torch.arange(inter, 2 * inter))
            gate_ups.append((m, modules[layout.down_proj[i]], f"{prefix}.{s}"))
        elif len(ups) in (1, 2):
            for s, m in ups:
                role = "gate" if len(ups) == 2 and "gate" in s.rsplit(".", 1)[-1] else "up"
                if role in bm.projections:
                    raise RegionsError(f"block {prefix}: cannot tell gate from up in "
                                       f"{[s for s, _ in ups]}")
                bm.projections[role] = proj(role, s, m)
        else:
            raise RegionsError(f"block {prefix}: expected 1 or 2 MLP input projections, found "
                               f"{[s for s, _ in ups]}")
        (o_sub, o_mod), inputs = _attention_parts(attn, hidden, prefix)
        bm.projections["o"] = proj("o", o_sub, o_mod)
        if len(inputs) == 1:
            s, m = inputs[0]
            n_heads, n_kv = _heads(cfg)
            hd = linear_shape(o_mod)[0] // n_heads
            n_rows = linear_shape(m)[1]
            if n_rows != (n_heads + 2 * n_kv) * hd:
                raise RegionsError(f"fused projection {prefix}.{s} has {n_rows} outputs; expected "
                                   f"(heads {n_heads} + 2 x kv heads {n_kv}) x head_dim {hd}")
            for r in "qkv":
                bm.projections[r] = proj(r, s, m)
            fused.append((m, o_mod, f"{prefix}.{s}", bm, (n_heads, n_kv, hd)))
        elif len(inputs) == 3:
            labels = [_label(s) for s, _ in inputs]
            if sorted(l or "" for l in labels) != ["k", "q", "v"]:
                labels = ["q", "k", "v"]  # definition order
            for (s, m), r in zip(inputs, labels):
                bm.projections[r] = proj(r, s, m)
        else:
            raise RegionsError(f"block {prefix}: expected q/k/v projections (3, or 1 fused), "
                               f"found {[s for s, _ in inputs]}")
    if fused:
        heads = fused[0][4]
        if fused_qkv != "auto":
            layouts = {f[0]: fused_qkv for f in fused}
        elif probe:
            layouts = _measure_qkv(model, [(m, o, n) for m, o, n, _, _ in fused], *heads)
        else:
            layouts = {f[0]: "per_head" for f in fused}
        for m, _, _, bm, hh in fused:
            for r, rows in qkv_rows(layouts[m], *hh).items():
                bm.projections[r].rows = rows
    if gate_ups and probe:
        _check_gate_up(model, gate_ups)
    return ModuleMap(blocks, hidden, inter)


def find_module_map(model: nn.Module, fused_qkv: str = "auto",
                    projections: bool = True) -> ModuleMap:
    """Build the :class:`ModuleMap` of ``model`` (see the module docstring).

    Args:
        fused_qkv: row layout of a fused q/k/v projection: ``auto`` (measured with one-token
            forward passes), ``per_head`` (per kv head ``[q.. | k | v]``) or ``concatenated``.
        projections: map the projections; False maps the norms only (all that outlier
            detection needs), which works on any model whose blocks are found.
    """
    return _build(model, fused_qkv, projections)


def check_module_map(model: nn.Module, needs: Literal["projections", "norms"] = "projections"
                     ) -> dict[str, Any]:
    """Check that :func:`find_module_map` can map ``model``'s structure, without running it
    (works on a model built on the meta device: :func:`models.meta_model`).

    Raises :class:`RegionsError` naming what cannot be mapped. Returns a summary: ``blocks``,
    ``hidden_size``, ``conv1d`` (weights stored ``[in, out]``) and ``fused`` (fused projections
    of one block, by role). A fused q/k/v layout is measured only once weights are loaded.
    """
    if needs not in MAP_NEEDS:
        raise RegionsError(f"needs '{needs}' is not one of {MAP_NEEDS}")
    mm = _build(model, projections=needs == "projections", measure_norms=False, probe=False)
    first = mm.blocks[0].projections if mm.blocks else {}
    fused: dict[str, list[str]] = {}
    for r, p in first.items():
        if p.rows is not None:
            fused.setdefault(p.param.rsplit(".", 2)[-2], []).append(r)
    return {"blocks": len(mm.blocks), "hidden_size": mm.hidden_size,
            "conv1d": any(p.transposed for p in first.values()), "fused": fused}


def _ranges(idx: torch.Tensor) -> list[list[int]]:
    """Sorted indices as ``[[start, stop), ...]`` runs."""
    idx = torch.sort(idx.long()).values.tolist()
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def matrix_layouts(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The logical layout of each block weight that is not one plain ``[out, in]`` matrix, for
    artefact metadata (so a region can be selected per logical matrix without the model).

    Returns ``{"layouts": {param: {"out_dim": 0 | 1, "parts": {role: [[start, stop], ...]}}}}``
    for the parameters (of ``names``, default all) stored ``[in, out]`` (``out_dim`` 1, GPT-2's
    ``Conv1D``) or fused (``parts``: the q/k/v or gate/up output-index ranges along
    ``out_dim``). For an architecture the module map cannot read it returns
    ``{"layouts": None, "layouts_error": message}`` instead of raising: importance works on
    any model, per-logical-matrix selection then falls back to whole parameters.
    """
    try:
        mm = _build(model, measure_norms=False)
    except RegionsError as e:
        return {"layouts": None, "layouts_error": str(e)}
    keep = set(names) if names is not None else None
    out: dict[str, dict[str, Any]] = {}
    for p in mm.projections():
        if (keep is not None and p.param not in keep) or not (p.transposed or p.rows is not None):
            continue
        entry = out.setdefault(p.param, {"out_dim": p.out_axis})
        if p.rows is not None:
            entry.setdefault("parts", {})[p.role] = _ranges(p.rows)
    return {"layouts": out}
