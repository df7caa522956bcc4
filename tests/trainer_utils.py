"""Helpers shared by the trainer_ext tests: in-memory datasets, Trainer args, tiny regions."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from lmeval_regions.models import block_parameters
from lmeval_regions.regions import select


class SeqDataset(torch.utils.data.Dataset):
    """``n`` random sequences of ``seq`` tokens (no padding), seeded."""

    def __init__(self, n: int = 8, seq: int = 12, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def training_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.05, max_steps=4,
                gradient_accumulation_steps=2, save_strategy="no", logging_strategy="no",
                lr_scheduler_type="linear", warmup_steps=0, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def make_trainer(model, out, callbacks=(), dataset=None, **kw) -> Trainer:
    return Trainer(model=model, args=training_args(out, **kw),
                   train_dataset=dataset or SeqDataset(),
                   callbacks=list(callbacks))


def top_region(model, ratio: float = 0.05, seed: int = 1):
    """A region over the block matrices and norms (random scores, seeded), with a model
    fingerprint, as ``select`` builds it."""
    from lmeval_regions.artefacts import model_fingerprint

    params = block_parameters(model, include_norms=True)
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    return select(scores, "top", ratio, model=model_fingerprint(model))
