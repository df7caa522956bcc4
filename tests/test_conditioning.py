"""The one conditioning rule: importance, activations and direct perplexity score exactly what
lm-eval's evaluation scores (tiny Llama with and without BOS, GPT-NeoX, BLOOM, GPT-2), and a
tokenizer that prepends BOS keeps its batches bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lmeval_regions.corpora import Conditioning, batches, collate, packed_sequences
from lmeval_regions.errors import RegionsError
from lmeval_regions.perplexity import batch_perplexity

TEXTS = [
    "All human beings are born free and equal in dignity and rights.",
    "Todos los seres humanos nacen libres e iguales en dignidad y derechos, dotados de razón.",
    "人人生而自由，在尊严和权利上一律平等。",
    "Все люди рождаются свободными и равными в своем достоинстве и правах.",
    "Mọi người sinh ra đều được tự do và bình đẳng về nhân phẩm và quyền lợi.",
]


# ----------------------------------------------------------------------------- tokenizers

def simple_tokenizer(bos: str | None, eos: str | None, add_bos: bool = False,
                     pad: str | None = None):
    """A byte-level BPE tokenizer (about 300 ids) trained on TEXTS, with the given special
    tokens; ``add_bos`` makes it prepend BOS as Llama's and Gemma's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [t for t in dict.fromkeys(("<unk>", bos, eos, pad)) if t]
    tk.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                   pad_token=pad, unk_token="<unk>")


def _smollm(add_bos: bool):
    from transformers import AutoTokenizer

    from lmeval_regions.models import resolve_pretrained

    return AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m"),
                                         **({"add_bos_token": True} if add_bos else {}))


# (architecture, tokenizer factory, what the tokenizer does by default)
CASES = {
    # SmolLM2's real tokenizer adds nothing; it has a BOS (<|im_start|>), the prefix
    "llama-smollm2-no-bos": ("llama", lambda: _smollm(False)),
    # the same tokenizer made to prepend BOS (as Llama's and Gemma's do)
    "llama-smollm2-adds-bos": ("llama", lambda: _smollm(True)),
    # Pythia-like: BOS = EOS = <|endoftext|>, adds nothing
    "gpt_neox": ("gpt_neox", lambda: simple_tokenizer("<|endoftext|>", "<|endoftext|>")),
    # BLOOM-like: <s>, </s>, <pad>, adds nothing
    "bloom": ("bloom", lambda: simple_tokenizer("<s>", "</s>", pad="<pad>")),
    # no BOS token at all: lm-eval's prefix is EOS
    "gpt2-no-bos-token": ("gpt2", lambda: simple_tokenizer(None, "<|endoftext|>")),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    arch, make = CASES[request.param]
    tok = make()
    model = tiny_model(arch, vocab_size=len(tok))
    # A random tiny model hardly depends on its context (a wrong context moves its sums by
    # ~1e-6); scaled matrices make context matter ~1e-3, far above the 1e-5 compared.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return request.param, model, tok


def _hflm(model, tok, max_length):
    from lm_eval.models.huggingface import HFLM

    # add_bos_token=False: how our demo, grid and README run lm-eval
    return HFLM(pretrained=model, tokenizer=tok, add_bos_token=False, batch_size=1,
                max_length=max_length)


def _rolling(lm, texts):
    from lm_eval.api.instance import Instance

    return lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
        disable_tqdm=True)


# ----------------------------------------------------------------------------- the rule

def test_prefix_is_lm_evals_prefix_token(case):
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    name, _, tok = case
    stand_in = SimpleNamespace(tokenizer=tok, custom_prefix_token_id=None)
    cond = Conditioning.of(tok)
    assert cond.prefix_token_id == HFLM.prefix_token_id.fget(stand_in)
    assert cond.prefix == ("eos" if name == "gpt2-no-bos-token" else "bos")
    assert cond.metadata() == {"rule": "lm-eval-prefix", "prefix": cond.prefix,
                               "prefix_token_id": cond.prefix_token_id,
                               "add_special_tokens": False}


def test_tokenizer_without_bos_or_eos_is_refused():
    tok = simple_tokenizer(None, None)
    with pytest.raises(RegionsError, match="neither a BOS nor an EOS"):
        Conditioning.of(tok)


def test_importance_losses_equal_lm_eval_loglikelihoods(case):
    """What compute_importance's forward computes on a text (model(**batch).loss, the mean
    token cross-entropy, times the tokens it scores) is lm-eval's rolling log-likelihood of
    that text, and the tokens scored are lm-eval's ``tok_encode(text)``."""
    from lmeval_regions.importance import compute_importance

    _, model, tok = case
    lm = _hflm(model, tok, 256)
    lls = _rolling(lm, TEXTS)
    for text, ll in zip(TEXTS, lls):
        (b,) = batches(tok, [text], 1, 256)
        n = int((b["labels"][:, 1:] != -100).sum())
        assert n == len(lm.tok_encode(text))
        with torch.no_grad():
            loss = float(model(**b).loss)
        assert loss * n == pytest.approx(-ll, rel=1e-5)
    # padded batches score the same tokens: perplexity over them is lm-eval's too
    r = batch_perplexity(model, batches(tok, TEXTS, 3, 256))
    assert r["tokens"] == sum(len(lm.tok_encode(t)) for t in TEXTS)
    assert r["nll"] == pytest.approx(-sum(lls), rel=1e-5)
    imp = compute_importance(model, batches(tok, TEXTS, 3, 256), progress=False)
    assert imp.n_tokens == r["tokens"]


def test_packed_document_is_lm_evals_rolling_windows(case):
    """A document longer than a sequence, packed into max_length = M sequences, scores the
    same tokens with the same contexts as lm-eval's rolling windows of M - 1: the sums agree."""
    _, model, tok = case
    doc = " ".join(TEXTS * 2)
    cond = Conditioning.of(tok)
    M = 32
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    assert len(ids) % (M - 1) not in (0, 1)  # the last window is partial: the left fill counts
    got = batch_perplexity(model, collate(packed_sequences([ids], cond, M), 2, 0))
    (ll,) = _rolling(_hflm(model, tok, M - 1), [doc])
    assert got["tokens"] == len(ids)
    assert got["nll"] == pytest.approx(-ll, rel=1e-5)


def old_batches(tokenizer, texts, batch_size, max_length):
    """The batches before the rule, from the tokenizer's own call (default special tokens)."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, padding_side="right")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": labels}


def assert_same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("max_length", [8, 256])
def test_bos_adding_tokenizer_batches_unchanged(max_length):
    """For a tokenizer that prepends BOS the rule is the tokenizer's own call, bit for bit
    (truncated or not)."""
    tok = _smollm(add_bos=True)
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert_same_batches(batches(tok, TEXTS, 2, max_length),
                         old_batches(tok, TEXTS, 2, max_length))


def test_activation_pooling_sees_the_prefix(smollm_tokenizer):
    """Activations read the same sequences: a tokenizer that adds no BOS gets the prefix."""
    (b,) = batches(smollm_tokenizer, ["Hello world"], 1, 16)
    assert b["input_ids"][0].tolist() == [smollm_tokenizer.bos_token_id] + \
        smollm_tokenizer.encode("Hello world", add_special_tokens=False)
