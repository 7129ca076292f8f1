"""The encoder-decoder model: cross-attention against the formula and torch's kernel, cached greedy decoding against
uncached, a tiny model that learns to reverse letters, equal parameter counts, and the
``decoder-vs-encoder-decoder`` experiment end to end with its errors."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from llmlab import cli
from llmlab.model.config import ModelConfig
from llmlab.model.decoder import Decoder
from llmlab.model.encoder_decoder import CrossAttention, EncoderDecoder, count_params

pytestmark = pytest.mark.usefixtures("single_threaded")


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, n_layer=3, n_head=4, d_model=32, max_seq_len=64, mlp="gelu", norm="rmsnorm",
                pos="rope", bias=False, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("impl, n_kv_head", [("math", 4), ("sdpa", 4), ("math", 2), ("sdpa", 1)])
def test_cross_attention_is_the_formula_and_torchs_kernel(impl, n_kv_head):
    torch.manual_seed(0)
    cfg = config(attn_impl=impl, n_kv_head=n_kv_head)
    attn = CrossAttention(cfg).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[1, 4:] = False                                    # the second source has 3 padding positions
    got = attn(x, attn.memory_kv(memory), real[:, None, None, :])

    h, d = cfg.n_head, cfg.head_dim
    q = (x @ attn.q.weight.T).view(2, 5, h, d).transpose(1, 2)
    k, v = (memory @ attn.kv.weight.T).view(2, 7, 2, n_kv_head, d).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(h // n_kv_head, 1), v.repeat_interleave(h // n_kv_head, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + torch.where(real, 0.0, -math.inf)[:, None, None, :]
    by_hand = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 5, h * d) @ attn.o_proj.weight.T
    assert torch.allclose(got, by_hand, atol=1e-5)
    kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
    assert torch.allclose(got, kernel.transpose(1, 2).reshape(2, 5, h * d) @ attn.o_proj.weight.T, atol=1e-5)
    # padding is invisible: changing the padded memory rows changes nothing
    memory2 = memory.clone()
    memory2[1, 4:] = 100.0
    assert torch.allclose(got, attn(x, attn.memory_kv(memory2), real[:, None, None, :]), atol=1e-5)


def untied(model: EncoderDecoder) -> EncoderDecoder:
    """A random output layer of its own: with the tied embedding a random model mostly repeats its last token, and
    a test of decoding wants varied outputs."""
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.embed.weight))
    return model.eval()


@pytest.mark.parametrize("pos, norm_position", [("rope", "pre"), ("learned", "pre"), ("rope", "post")])
def test_cached_greedy_decoding_equals_uncached_token_for_token(pos, norm_position):
    torch.manual_seed(1)
    model = untied(EncoderDecoder(config(pos=pos, norm_position=norm_position, init_std=0.3), n_encoder_layer=2))
    src = torch.randint(4, 40, (4, 9))
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    cached = model.generate(src, mask, start_id=1, eos_id=3, max_new_tokens=12)
    uncached = model.generate(src, mask, start_id=1, eos_id=3, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert len({tuple(r) for r in cached}) > 1 and any(len(set(r)) > 1 for r in cached)   # not a trivial output
    # a padded source decodes as it does alone, unpadded
    alone = model.generate(src[1:2, :5], None, start_id=1, eos_id=3, max_new_tokens=12)
    assert alone[0] == cached[1]


def test_teacher_forcing_logits_equal_step_by_step_decoding():
    torch.manual_seed(2)
    model = EncoderDecoder(config(init_std=0.3)).eval()
    src, tgt = torch.randint(4, 40, (2, 6)), torch.randint(4, 40, (2, 5))
    full = model(src, tgt)
    kv = model.cross_kv(model.encode(src))
    cache = model.new_cache(2, 8)
    steps = torch.cat([model.decode(tgt[:, i:i + 1], kv, None, cache) for i in range(5)], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)
    assert cache.length == 5


def test_the_source_is_read_both_ways_and_the_target_causally():
    torch.manual_seed(3)
    model = EncoderDecoder(config(init_std=0.3)).eval()
    src, tgt = torch.randint(4, 40, (1, 6)), torch.randint(4, 40, (1, 5))
    base = model(src, tgt)
    src2 = src.clone()
    src2[0, -1] = (src[0, -1] + 1 - 4) % 36 + 4          # the last source token changes every target position
    assert (model(src2, tgt) - base).abs()[0, 0].max() > 1e-4
    tgt2 = tgt.clone()
    tgt2[0, -1] = (tgt[0, -1] + 1 - 4) % 36 + 4          # a later target token changes no earlier position
    assert torch.allclose(model(src, tgt2)[0, :-1], base[0, :-1], atol=1e-6)


def test_equal_parameters_three_plus_three_layers_against_seven():
    """With a GELU MLP of 4d, a layer holds 12d² weights and cross-attention 4d² more: 3·12 + 3·16 = 7·12 (×d²).
    What is left is norms: one per sub-layer, so the two differ by a few vectors of d."""
    from llmlab.experiments.decoder_vs_encoder_decoder import build_models, param_table
    cfg = config(d_model=64, n_head=4, vocab_size=50)
    encdec = EncoderDecoder(cfg)
    decoder = Decoder(config(d_model=64, n_head=4, vocab_size=50, n_layer=7))
    d = 64
    assert count_params(decoder) == 50 * d + 7 * (12 * d * d + 2 * d) + d     # embedding (tied), 7 layers, final norm
    assert count_params(encdec) == 50 * d + 3 * (12 * d * d + 2 * d) + d + 3 * (16 * d * d + 3 * d) + d
    assert count_params(encdec) - count_params(decoder) == 2 * d      # 17 norm gains against 15
    models = build_models({"d_model": 64, "n_head": 4, "encoder_layers": 3, "decoder_layers": 3, "norm": "rmsnorm", "pos": "rope",
                           "max_seq_len": 64}, vocab_size=50)
    assert models["decoder-only"].config.n_layer == 7
    table = param_table(models)
    assert abs(table["encoder-decoder"] / table["decoder-only"] - 1) < 0.01


def reverse_batch(rng: random.Random, n: int):
    """(src, src_mask, tgt_in, tgt_out): reverse 2-5 letters of a 6-letter alphabet; ids 4.. are letters."""
    srcs = [[rng.randrange(4, 10) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    s = max(map(len, srcs))
    src = torch.tensor([x + [0] * (s - len(x)) for x in srcs])
    mask = (src != 0).long()
    tgt_in = torch.tensor([[1] + x[::-1] + [0] * (s - len(x)) for x in srcs])
    tgt_out = torch.tensor([x[::-1] + [3] + [-100] * (s - len(x)) for x in srcs])
    return src, mask, tgt_in, tgt_out, srcs


def test_a_tiny_model_learns_to_reverse_letters():
    torch.manual_seed(0)
    rng = random.Random(0)
    model = EncoderDecoder(config(n_layer=2, d_model=48, n_head=4, vocab_size=12, max_seq_len=16, pos="learned"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        src, mask, tgt_in, tgt_out, _ = reverse_batch(rng, 32)
        loss = F.cross_entropy(model(src, tgt_in, mask).flatten(0, 1), tgt_out.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    src, mask, _, _, srcs = reverse_batch(random.Random(99), 100)
    out = model.eval().generate(src, mask, start_id=1, eos_id=3, max_new_tokens=8)
    exact = sum(o == x[::-1] for o, x in zip(out, srcs)) / len(srcs)
    assert exact >= 0.9, exact


# --- the experiment --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encdec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "encdec"
    assert cli.main(["experiment", "decoder-vs-encoder-decoder", "--preset", "test", "--out", str(out)]) == 0
    return out


def test_the_experiment_writes_its_report_summary_and_figures(encdec_run):
    summary = json.loads((encdec_run / "summary.json").read_text())
    assert summary["experiment"] == "decoder-vs-encoder-decoder" and summary["seeds"] == [0, 1]
    arms = summary["arms"]
    assert set(arms) == {"decoder-only", "encoder-decoder"}
    for arm in arms.values():
        for key in ("exact_match", "train_tokens_per_s", "ms_per_token", "cache_kib", "lm_loss", "flops_per_example"):
            assert arm[key]["n"] == 2, key
        assert set(arm["exact_by_kind"]) == {"reverse", "sort", "arithmetic"}
        assert all(0 <= v <= 1 for v in arm["exact_match"]["values"])
    assert 0.98 < summary["params"]["encoder-decoder"] / summary["params"]["decoder-only"] < 1.02
    report = (encdec_run / "report.md").read_text()
    for figure in summary["figures"]:
        assert (encdec_run / figure).stat().st_size > 0 and f"]({figure})" in report
    html = (encdec_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(summary["figures"]) == 3
    assert f"{summary['params']['decoder-only']:,}" in report
    assert "±" in report and "prefix" in report


def test_a_second_invocation_trains_nothing(encdec_run, monkeypatch):
    from llmlab.experiments import decoder_vs_encoder_decoder as exp

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(exp, "train", no_training)
    before = (encdec_run / "summary.json").read_text()
    assert cli.main(["experiment", "decoder-vs-encoder-decoder", "--preset", "test", "--out", str(encdec_run)]) == 0
    after = json.loads((encdec_run / "summary.json").read_text())
    assert after["arms"] == json.loads(before)["arms"]


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Kill a run after its first checkpoint; the rerun continues from it and ends where an uninterrupted run ends."""
    from llmlab.experiments import decoder_vs_encoder_decoder as exp
    from llmlab.experiments.common import Context, resolve

    settings, _ = resolve(exp, "decoder-vs-encoder-decoder", "test", ["steps=6", "checkpoint_every=3"])
    whole = exp.train_arm(Context("x", tmp_path / "a", "test", settings, [0]), "encoder-decoder", "tasks", 0)

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == 4:
            raise Killed
    ctx = Context("x", tmp_path / "b", "test", settings, [0])
    with pytest.raises(Killed):
        exp.train_arm(ctx, "encoder-decoder", "tasks", 0, on_step=kill)
    resumed = exp.train_arm(ctx, "encoder-decoder", "tasks", 0)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--set", "nonsense=1"], "--set nonsense: experiment decoder-vs-encoder-decoder has no such setting"),
    (["--set", "model.d_model=30", "--set", "model.n_head=4"], "model.d_model (30) must be divisible"),
    (["--set", "kinds=[reverse,juggle]"], "kinds"),
    (["--set", "steps=0"], "steps"),
    (["--set", "model.d_ff=100"], "model.d_ff"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["experiment", "decoder-vs-encoder-decoder", "--preset", "test", *args, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
