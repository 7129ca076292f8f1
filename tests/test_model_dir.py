"""ModelDir: our folder, a Hugging Face folder, a hub id from the local Hugging Face cache and a .gguf file, each
resolved once into a local folder with its config, tokenizer, chat template and context; and the errors a user
gets for a path or a hub id that names nothing."""
import pytest
import transformers

from llmlab.chat import DEFAULT_TEMPLATE, TEMPLATES
from llmlab.errors import LLMLabError
from llmlab.hub import gguf as hub_gguf
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_model, load_our_model
from llmlab.hub.save import save_model
from llmlab.model.config import preset
from llmlab.model.decoder import Decoder, build_model
from conftest import write_tiny_llama_gguf

transformers.logging.set_verbosity_error()


@pytest.fixture
def our_folder(tmp_path, byte_tokenizer):
    """A tiny Llama of ours with the byte-level tokenizer and the ChatML template, where a run puts it."""
    model = build_model(preset("llama", vocab_size=len(byte_tokenizer), n_layer=1, n_head=2, d_model=16,
                               max_seq_len=48))
    return save_model(model, tmp_path / "runs" / "sft" / "model", tokenizer=byte_tokenizer,
                      chat_template=TEMPLATES["chatml"])


def test_our_folder(our_folder):
    model = ModelDir(our_folder)
    assert model.path == our_folder and model.name == "sft"
    assert model.config.model_type == "llama" and model.context == 48
    assert model.tokenizer().pad_token == "<|pad|>"
    assert model.template() == TEMPLATES["chatml"] and model.template("llama-3") == TEMPLATES["llama-3"]
    assert ModelDir.of(model) is model and ModelDir.of(str(our_folder)).path == our_folder


def test_config_json_is_parsed_once_per_model(our_folder, monkeypatch):
    calls = []
    from_pretrained = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: calls.append(a) or from_pretrained(*a, **k))
    model = ModelDir(our_folder)
    assert isinstance(load_model(model), Decoder)
    assert load_our_model(model, num_labels=2).config.num_labels == 2
    assert len(calls) == 1


def test_hugging_face_folder_without_a_template_gets_the_default(tmp_path, byte_tokenizer):
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(byte_tokenizer), n_embd=16,
                                                                  n_layer=1, n_head=2, n_positions=40))
    theirs.save_pretrained(tmp_path / "gpt2-tiny")
    byte_tokenizer.save_pretrained(tmp_path / "gpt2-tiny")
    model = ModelDir(tmp_path / "gpt2-tiny")
    assert model.name == "gpt2-tiny" and model.context == 40
    assert model.template() == TEMPLATES[DEFAULT_TEMPLATE]
    assert len(model.tokenizer()) == len(byte_tokenizer)


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny-chat.gguf", chat=True)
    model = ModelDir(gguf_path)
    assert model.path == hub_gguf.cache_dir(gguf_path) and model.path.parent == tmp_path / "cache" / "gguf"
    assert model.name == "tiny-chat" and model.context == 64
    assert model.template() == TEMPLATES["chatml"]            # the template the file carries
    assert model.tokenizer().pad_token == "<|pad|>"

    def no_conversion(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(hub_gguf, "convert", no_conversion)
    assert ModelDir(gguf_path).path == model.path


def test_hub_id_resolves_from_the_local_cache_offline(our_folder, fake_hub):
    model = ModelDir(fake_hub("llmlab-test/tiny-chat", our_folder))
    assert model.path.parent.name == "snapshots" and (model.path / "model.safetensors").is_file()
    assert model.name == "tiny-chat" and model.context == 48
    assert model.template() == TEMPLATES["chatml"] and model.tokenizer().pad_token == "<|pad|>"
    assert isinstance(load_model(model), Decoder)


def test_errors_name_what_is_missing(tmp_path, fake_hub):
    with pytest.raises(LLMLabError, match="model directory not found"):
        ModelDir(tmp_path / "nowhere")
    with pytest.raises(LLMLabError, match="GGUF file not found"):
        ModelDir(tmp_path / "nowhere.gguf")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LLMLabError, match="neither a model directory nor a .gguf file"):
        ModelDir(tmp_path / "notes.txt")
    with pytest.raises(LLMLabError, match="llmlab-test/absent: .*not in the local cache.*HF_HUB_OFFLINE is set"):
        ModelDir("llmlab-test/absent")
    empty = ModelDir(tmp_path)
    with pytest.raises(LLMLabError, match="no config.json"):
        empty.config
    with pytest.raises(LLMLabError, match=f"{tmp_path}: no tokenizer files"):
        empty.tokenizer()
