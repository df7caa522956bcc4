"""2-process DDP and FSDP2 (``fully_shard``) on CPU with gloo: frozen entries stay bit-identical
under AdamW(weight_decay) + clipping + accumulation, frozen gradients are masked before
clipping, and ImportanceCallback accumulates (FSDP2: local shards) and gathers the full scores."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _batches(rank: int, n: int):
    from conftest import random_batches

    return random_batches(n=n, batch=2, seq=10, seed=100 + rank)


def _worker(rank: int, kind: str, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _run(rank, kind, out_dir)
    finally:
        dist.destroy_process_group()


def _run(rank: int, kind: str, out_dir: str) -> None:
    from conftest import tiny_model
    from trainer_utils import top_region

    from lmeval_regions.importance import Importance, ImportanceAccumulator
    from lmeval_regions.models import block_parameters
    from trainer_ext import FreezeRegionAdapter, ImportanceCallback
    from trainer_ext.sharding import full_tensor, local

    model = tiny_model("llama")  # same seed on both ranks: identical replicas
    region = top_region(model, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
        assert type(next(model.parameters())).__name__ == "DTensor"

    # ---- importance: one step, compared with the full-gradient reference on rank 0 --------
    cb = ImportanceCallback()
    args = SimpleNamespace(max_grad_norm=0.0, output_dir=out_dir)
    state = SimpleNamespace(global_step=0, is_world_process_zero=rank == 0, num_input_tokens_seen=0)
    cb.on_train_begin(args, state, None, model=wrapped)
    b = _batches(rank, 1)[0]
    wrapped(**b).loss.backward()  # gradients averaged over ranks (DDP all-reduce / FSDP2 RS)
    cb.on_pre_optimizer_step(args, state, None)
    cb.on_train_end(args, state, None)
    for p in model.parameters():
        p.grad = None
    if rank == 0:
        twin = tiny_model("llama")
        loss = sum(twin(**_batches(r, 1)[0]).loss for r in range(WORLD)) / WORLD
        loss.backward()
        acc = ImportanceAccumulator(block_parameters(twin))
        acc.accumulate()
        got = Importance.load(os.path.join(out_dir, "importance.safetensors"))
        for n, ref in acc.result().items():
            torch.testing.assert_close(got.scores[n], ref, rtol=1e-4, atol=1e-9)

    # ---- freeze: AdamW(wd) + clipping + accumulation ------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    adapter = FreezeRegionAdapter(wrapped, region, opt)
    accum, steps = 2, 3
    batches = _batches(rank, accum * steps)
    for s in range(steps):
        for i, mb in enumerate(batches[s * accum:(s + 1) * accum]):
            last = i == accum - 1
            if kind == "ddp" and not last:
                with wrapped.no_sync():
                    (wrapped(**mb).loss / accum).backward()
            else:
                if kind == "fsdp2":
                    model.set_requires_gradient_sync(last)
                (wrapped(**mb).loss / accum).backward()
        for n, e in adapter.entries.items():  # masked before clipping, after the all-reduce
            assert torch.all(local(e.param.grad).view(-1)[e.idx] == 0), n
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        assert norm > 0.05, "clipping must be active"
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    adapter.remove()
    changed = total = 0
    for n, p in model.named_parameters():
        full = full_tensor(local(p.detach()), p) if kind == "fsdp2" else p.detach()
        if n in region.indices:
            idx = region.indices[n].long()
            assert torch.equal(full.reshape(-1)[idx], before[n].reshape(-1)[idx]), n
            m = ~region.mask(n).reshape(-1)
            changed += int((full.reshape(-1)[m] != before[n].reshape(-1)[m]).sum())
            total += int(m.sum())
    assert changed > 0.9 * total, (changed, total)
    if kind == "fsdp2":  # each rank holds only its shard's entries of the region
        k_local = torch.tensor([sum(e.idx.numel() for e in adapter.entries.values())])
        dist.all_reduce(k_local)
        assert int(k_local) == region.numel()


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_process_freeze_and_importance(tmp_path, kind):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for this test")
    mp.spawn(_worker, args=(kind, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "importance.safetensors").is_file()
