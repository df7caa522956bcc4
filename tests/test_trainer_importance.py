"""ImportanceCallback: equals the library's computation, resumes exactly, skips non-finite steps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from trainer_utils import SeqDataset, make_trainer
from transformers import TrainerCallback

from lmeval_regions.errors import RegionsError
from lmeval_regions.importance import Importance, ImportanceConfig, compute_importance
from trainer_ext import ImportanceCallback
from trainer_ext.importance_callback import ARTEFACT_NAME, STATE_NAME


def library_batches(ds: SeqDataset, per_step: int):
    """The Trainer's optimizer-step batches under a sequential sampler, as one batch each."""
    out = []
    for i in range(0, len(ds), per_step):
        rows = [ds[j] for j in range(i, i + per_step)]
        out.append({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return out


@pytest.mark.parametrize("mode", ["sum_abs", "abs_sum", "fisher"])
@pytest.mark.parametrize("accum", [1, 2])
def test_callback_equals_library(tmp_path, arch, mode, accum):
    """lr = 0 keeps θ fixed, so the Trainer's per-step gradients are exactly the library's
    per-batch gradients of the same sequences (equal lengths: the Trainer's token-weighted loss
    over accumulated micro-batches is the mean over the step's tokens)."""
    ds = SeqDataset(n=8, seq=12)
    model = tiny_model(arch)
    cb = ImportanceCallback(ImportanceConfig(criteria=(mode,)), languages=["xx"])
    trainer = make_trainer(model, tmp_path, [cb], dataset=ds, learning_rate=0.0, max_grad_norm=0.0,
                           per_device_train_batch_size=1, gradient_accumulation_steps=accum,
                           max_steps=8 // accum, train_sampling_strategy="sequential")
    trainer.train()
    ref = compute_importance(tiny_model(arch), library_batches(ds, accum),
                             ImportanceConfig(criteria=(mode,)), progress=False)
    got = Importance.load(tmp_path / ARTEFACT_NAME, model)
    assert got.criterion == mode and got.languages == ["xx"] and got.n_skipped == 0
    assert got.extra["batch_size"] == ref.extra["batch_size"] == accum
    assert got.sources[0]["optimizer_steps"] == 8 // accum
    assert set(got.scores) == set(ref.scores)
    assert got.model["sha256"] == ref.model["sha256"]
    for n in ref.scores:
        torch.testing.assert_close(got.scores[n], ref.scores[n], rtol=1e-4, atol=1e-9)
        assert ref.scores[n].abs().sum() > 0


def test_before_clip_recovers_unclipped_gradients(tmp_path):
    ds = SeqDataset(n=8, seq=12)
    kw = dict(dataset=ds, learning_rate=0.0, max_grad_norm=0.01, per_device_train_batch_size=2,
              gradient_accumulation_steps=1, max_steps=4, train_sampling_strategy="sequential")
    ref = compute_importance(tiny_model("llama"), library_batches(ds, 2), progress=False)
    results = {}
    for before in (False, True):
        cb = ImportanceCallback(before_clip=before)
        trainer = make_trainer(tiny_model("llama"), tmp_path / str(before), [], **kw)
        cb.attach(trainer)
        trainer.train()
        results[before] = cb.importance
    for n in ref.scores:
        torch.testing.assert_close(results[True].scores[n], ref.scores[n], rtol=1e-4, atol=1e-9)
        # clipping was active: the after-clip scores are much smaller
        assert results[False].scores[n].sum() < 0.5 * ref.scores[n].sum()
    assert results[True].extra["gradients"] == "before_clip"


def test_callback_refuses_what_it_cannot_accumulate():
    for cfg, match in [(ImportanceConfig(criteria=("wanda",)), "one gradient criterion"),
                       (ImportanceConfig(criteria=("magnitude",)), "one gradient criterion"),
                       (ImportanceConfig(criteria=("sum_abs", "fisher")), "one gradient criterion"),
                       (ImportanceConfig(snapshots=(10,)), "no snapshots")]:
        with pytest.raises(RegionsError, match=match):
            ImportanceCallback(cfg)


def test_before_clip_without_attach_is_an_error(tmp_path):
    trainer = make_trainer(tiny_model("llama"), tmp_path, [ImportanceCallback(before_clip=True)])
    with pytest.raises(RegionsError, match="attach"):
        trainer.train()


def test_resume_gives_the_uninterrupted_artefact(tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2,
              max_grad_norm=0.05, learning_rate=1e-2, weight_decay=0.1)
    cb = ImportanceCallback()
    assert cb.criterion == "sum_abs"  # paper 1's estimator by default
    make_trainer(tiny_model("llama"), tmp_path, [cb], **kw).train()
    full = cb.importance
    assert (tmp_path / "checkpoint-2" / STATE_NAME).is_file()
    mid = Importance.load(tmp_path / "checkpoint-2" / ARTEFACT_NAME)
    assert mid.sources[0]["optimizer_steps"] == 2

    cb2 = ImportanceCallback()
    # weights come from the checkpoint
    trainer = make_trainer(tiny_model("llama", seed=1), tmp_path, [cb2], **kw)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = cb2.importance
    assert resumed.sources[0]["optimizer_steps"] == 4
    for n in full.scores:
        # Same weights, optimizer state, RNG and data order are restored by the Trainer:
        # the resumed run recomputes steps 3-4 bit-for-bit.
        assert torch.equal(resumed.scores[n], full.scores[n]), n
        assert not torch.equal(mid.scores[n], full.scores[n])


def test_resume_without_state_is_an_error(tmp_path):
    kw = dict(max_steps=2, save_strategy="steps", save_steps=2)
    make_trainer(tiny_model("llama"), tmp_path, [], **kw).train()  # checkpoint without our state
    trainer = make_trainer(tiny_model("llama"), tmp_path, [ImportanceCallback()], max_steps=4)
    with pytest.raises(RegionsError, match=STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


class InjectInf(TrainerCallback):
    """Puts an inf into one gradient at the given optimizer steps (0-based global_step)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step in self.steps:
            p = model.model.layers[0].mlp.down_proj.weight
            p.grad.view(-1)[7] = float("inf")


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    kw = dict(lr_scheduler_type="constant", gradient_accumulation_steps=1, max_grad_norm=0.0)
    cb = ImportanceCallback()
    # inf on the last step only, so the (un-skipped) optimizer cannot spread NaN into steps we score
    make_trainer(tiny_model("llama"), tmp_path / "a", [InjectInf([3]), cb], max_steps=4,
                 **kw).train()
    ref_cb = ImportanceCallback()
    make_trainer(tiny_model("llama"), tmp_path / "b", [ref_cb], max_steps=3, **kw).train()
    got = Importance.load(tmp_path / "a" / ARTEFACT_NAME)
    assert got.n_skipped == 1 and got.sources[0]["optimizer_steps"] == 3
    for n in got.scores:
        assert torch.isfinite(got.scores[n]).all()
        assert torch.equal(got.scores[n], ref_cb.importance.scores[n]), n
