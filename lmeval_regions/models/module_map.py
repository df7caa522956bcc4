"""A map of each decoder block's projections and norms, found by module structure.

For every block: the attention input projections q/k/v (separate, or rows of one fused
projection), the attention output projection o, the MLP up (and gate) and down projections, and
the block's norms. Nothing here branches on the model's name:

* the MLP is the parent of the down projection that :func:`architecture.find_layout` finds; its
  other linear layers map hidden -> intermediate: two of them are gate and up (the one whose
  attribute name contains ``gate`` is gate), one is up;
* the attention module is the block's other child holding linear layers; its *last* linear layer
  (definition order) maps heads -> hidden and is o; the others are q/k/v, labelled by the letter
  their attribute name ends with (``q_proj``, ``query``...) or else by order;
* one fused input projection (BLOOM's ``query_key_value``) is split into q/k/v row blocks using
  the config's head counts; the layout is per head ``[q | k | v]`` (BLOOM, GPT-NeoX, Falcon),
  or ``concatenated`` ``[q... | k... | v...]`` when asked;
* norms are the block's modules with a 1-D ``weight`` of hidden size (plus per-head norms such as
  Gemma3's ``q_norm``); whether a norm scales by ``w`` or by ``1 + w`` (Gemma) is *measured* by
  running it, so "reset to 1" means an effective scale of 1 on every architecture.

Weights are torch ``[out, in]``. Each :class:`Projection` exposes a logical ``[out_l, in]`` view
(``rows`` picks the fused rows) and says which side is the residual (hidden) dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmeval_regions.errors import RegionsError
from lmeval_regions.models.architecture import find_layout, linear_shape, text_config

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Which side of each projection is the residual stream ("hidden"); the other side is an attention
# head feature (q/k/v out, o in) or an MLP neuron (up/gate out, down in).
HIDDEN_SIDE = {"q": "in", "k": "in", "v": "in", "o": "out", "gate": "in", "up": "in", "down": "out"}


@dataclass
class Projection:
    """One logical projection matrix inside a block.

    Attributes:
        role: one of ``q, k, v, o, gate, up, down``.
        param: full name of the torch weight, shape ``[out, in]``.
        shape: that weight's shape.
        rows: torch rows that make up this projection (``None`` = all); for a fused q/k/v these
            are the q (or k, v) rows, in head order, so logical out index ``i`` is torch row
            ``rows[i]``.
    """

    role: str
    param: str
    shape: list[int]
    rows: torch.Tensor | None = None

    @property
    def out_size(self) -> int:
        return self.shape[0] if self.rows is None else int(self.rows.numel())

    @property
    def in_size(self) -> int:
        return self.shape[1]

    @property
    def hidden_side(self) -> str:
        return HIDDEN_SIDE[self.role]

    def size(self, side: str) -> int:
        return self.out_size if side == "out" else self.in_size

    def torch_rows(self) -> torch.Tensor:
        return torch.arange(self.shape[0]) if self.rows is None else self.rows

    def logical(self, full: torch.Tensor) -> torch.Tensor:
        """The ``[out_l, in]`` view of a tensor shaped like the whole weight."""
        return full if self.rows is None else full[self.rows]

    def flat_indices(self, side: str, dims: torch.Tensor) -> torch.Tensor:
        """Flat indices into the torch weight of logical ``dims`` on ``side`` (sorted, int64).

        ``out`` dims are whole logical rows; ``in`` dims are columns restricted to this
        projection's rows (a fused q's column ``j`` does not touch k's or v's rows).
        """
        dims = dims.long()
        n_in = self.shape[1]
        if side == "out":
            rows = self.torch_rows()[dims]
            idx = (rows[:, None] * n_in + torch.arange(n_in)[None, :]).reshape(-1)
        elif side == "in":
            idx = (self.torch_rows()[:, None] * n_in + dims[None, :]).reshape(-1)
        else:
            raise RegionsError(f"side '{side}' is not 'in' or 'out'")
        return torch.sort(idx).values


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


def find_module_map(model: nn.Module, fused_qkv: str = "per_head") -> ModuleMap:
    """Build the :class:`ModuleMap` of ``model`` (see the module docstring).

    Args:
        fused_qkv: row layout of a fused q/k/v projection: ``per_head`` (BLOOM, GPT-NeoX) or
            ``concatenated``.
    """
    if fused_qkv not in ("per_head", "concatenated"):
        raise RegionsError(f"fused_qkv '{fused_qkv}' is not 'per_head' or 'concatenated'")
    layout = find_layout(model)
    cfg = text_config(model)
    hidden = layout.hidden_size
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    modules = dict(model.named_modules())
    blocks = []
    for i in range(layout.num_layers):
        prefix = layout.block(i)
        block = modules[prefix]
        down_sub = layout.down_proj[i][len(prefix) + 1:]
        mlp_sub = down_sub.rsplit(".", 1)[0] if "." in down_sub else ""
        bm = BlockMap(i)
        linears = [(s, m) for s, m in block.named_modules() if linear_shape(m)]
        for s, m in linears:
            if type(m).__name__ == "Conv1D":
                raise RegionsError(f"'{prefix}.{s}' is a GPT-2 style Conv1D ([in, out] weight); "
                                   "dimension maps support nn.Linear blocks only")
        mlp = [(s, m) for s, m in linears if mlp_sub and s.startswith(mlp_sub + ".")]
        attn = [(s, m) for s, m in linears if (s, m) not in mlp]
        bm.projections["down"] = Projection("down", f"{layout.down_proj[i]}.weight",
                                            list(modules[layout.down_proj[i]].weight.shape))
        ups = [(s, m) for s, m in mlp if s != down_sub]
        if len(ups) not in (1, 2):
            raise RegionsError(f"block {prefix}: expected 1 or 2 MLP input projections, found "
                               f"{[s for s, _ in ups]}")
        for s, m in ups:
            role = "gate" if len(ups) == 2 and "gate" in s.rsplit(".", 1)[-1] else "up"
            if role in bm.projections:
                raise RegionsError(f"block {prefix}: cannot tell gate from up in "
                                   f"{[s for s, _ in ups]}")
            bm.projections[role] = Projection(role, f"{prefix}.{s}.weight", list(m.weight.shape))
        if len(attn) < 2:
            raise RegionsError(f"block {prefix}: expected attention projections, found "
                               f"{[s for s, _ in attn]}")
        (o_sub, o_mod), inputs = attn[-1], attn[:-1]
        bm.projections["o"] = Projection("o", f"{prefix}.{o_sub}.weight", list(o_mod.weight.shape))
        if len(inputs) == 1:
            s, m = inputs[0]
            shape = list(m.weight.shape)
            hd = o_mod.weight.shape[1] // n_heads
            if shape[0] != (n_heads + 2 * n_kv) * hd:
                raise RegionsError(f"fused projection {prefix}.{s} has {shape[0]} rows; expected "
                                   f"(heads {n_heads} + 2 x kv heads {n_kv}) x head_dim {hd}")
            if fused_qkv == "per_head":
                if n_kv != n_heads:
                    raise RegionsError("per-head fused q/k/v layout needs as many kv heads as heads")
                grid = torch.arange(shape[0]).view(n_heads, 3, hd)
                parts = {r: grid[:, j].reshape(-1) for j, r in enumerate("qkv")}
            else:
                sizes = [n_heads * hd, n_kv * hd, n_kv * hd]
                parts = dict(zip("qkv", torch.arange(shape[0]).split(sizes)))
            for r, rows in parts.items():
                bm.projections[r] = Projection(r, f"{prefix}.{s}.weight", shape, rows)
        elif len(inputs) == 3:
            labels = [_label(s) for s, _ in inputs]
            if sorted(l or "" for l in labels) != ["k", "q", "v"]:
                labels = ["q", "k", "v"]  # definition order
            for (s, m), r in zip(inputs, labels):
                bm.projections[r] = Projection(r, f"{prefix}.{s}.weight", list(m.weight.shape))
        else:
            raise RegionsError(f"block {prefix}: expected q/k/v projections (3, or 1 fused), "
                               f"found {[s for s, _ in inputs]}")
        for s, m in block.named_modules():
            w = getattr(m, "weight", None)
            if s and w is not None and w.dim() == 1 and not linear_shape(m):
                bm.norms.append(Norm(f"{prefix}.{s}.weight", w.numel(), _norm_offset(m, w.numel())))
        blocks.append(bm)
    return ModuleMap(blocks, hidden, layout.intermediate_size)
