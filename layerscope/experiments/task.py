"""A fine-tuning task read from the files people keep: JSONL, CSV, Parquet, or a ``datasets`` folder.

Sequence classification needs a text column and a label column (strings or integers; strings are
numbered in sorted order); causal-LM needs a text column.  The evaluation rows come from a second file
(``eval_path``) or a seeded split of the first.  Every problem (a file that does not parse, a missing
column, an empty split, a label the training rows never show) is one LayerscopeError naming the file
and column, raised before any model is built.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError

KINDS = ("classification", "causal-lm")


@dataclass
class Task:
    kind: str
    train_texts: list[str]
    eval_texts: list[str]
    train_labels: list[int] = field(default_factory=list)
    eval_labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "train_rows": len(self.train_texts),
                "eval_rows": len(self.eval_texts), "labels": self.label_names}


def load_task(path: str | Path, kind: str = "classification", *, text_column: str = "text",
              label_column: str = "label", eval_path: str | Path | None = None, eval_fraction: float = 0.2,
              seed: int = 0, max_rows: int | None = None) -> Task:
    if kind not in KINDS:
        raise LayerscopeError(f"--task-kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not 0 < eval_fraction < 1:
        raise LayerscopeError(f"--eval-fraction {eval_fraction}: must be between 0 and 1")
    train = _rows(Path(path), text_column, label_column if kind == "classification" else None)
    if eval_path is not None:
        evaluation = _rows(Path(eval_path), text_column, label_column if kind == "classification" else None)
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, round(len(train) * eval_fraction))
        evaluation, train = train.iloc[order[:cut]], train.iloc[order[cut:]]
    if max_rows is not None:
        train = train.iloc[:max_rows]
    if len(train) < 2 or len(evaluation) < 1:
        raise LayerscopeError(f"{path}: {len(train)} training and {len(evaluation)} evaluation rows; need at "
                              "least 2 and 1")
    task = Task(kind, list(train["text"]), list(evaluation["text"]), source=str(path))
    if kind == "classification":
        names = sorted({str(v) for v in train["label"]}, key=_label_order)
        unseen = sorted({str(v) for v in evaluation["label"]} - set(names))
        if unseen:
            raise LayerscopeError(f"{eval_path or path}: column {label_column!r}: label {unseen[0]!r} never occurs "
                                  "in the training rows")
        if len(names) < 2:
            raise LayerscopeError(f"{path}: column {label_column!r} has one label ({names[0]!r}); a classifier "
                                  "needs two or more")
        index = {name: i for i, name in enumerate(names)}
        task.label_names = names
        task.train_labels = [index[str(v)] for v in train["label"]]
        task.eval_labels = [index[str(v)] for v in evaluation["label"]]
    return task


def _label_order(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _rows(path: Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    table = _read(path)
    for column in (text_column, label_column):
        if column is not None and column not in table.columns:
            raise LayerscopeError(f"{path}: no column {column!r} (columns: {', '.join(map(str, table.columns))})")
    out = pd.DataFrame({"text": table[text_column]})
    if label_column is not None:
        out["label"] = table[label_column]
    bad = out["text"].map(lambda t: not isinstance(t, str) or not t.strip())
    if bad.any():
        raise LayerscopeError(f"{path}: column {text_column!r}: row {int(bad.to_numpy().nonzero()[0][0])} is not "
                              "text (empty or another type)")
    if label_column is not None and out["label"].isna().any():
        raise LayerscopeError(f"{path}: column {label_column!r}: row {int(out['label'].isna().to_numpy().nonzero()[0][0])}"
                              " has no label")
    return out.reset_index(drop=True)


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise LayerscopeError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return _read_saved_dataset(path)
        if path.suffix == ".jsonl":
            return pd.DataFrame([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                                 if line.strip()])
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
    except LayerscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser raises its own types
        raise LayerscopeError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    raise LayerscopeError(f"{path}: expected .jsonl, .csv, .parquet or a datasets folder (save_to_disk)")


def _read_saved_dataset(folder: Path) -> pd.DataFrame:
    """A ``Dataset.save_to_disk`` folder (Arrow stream files listed in state.json), without needing ``datasets``;
    a DatasetDict folder reads its ``train`` split."""
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise LayerscopeError(f"{folder}: a DatasetDict without a 'train' split (splits: {', '.join(splits)})")
        folder = folder / "train"
    state = folder / "state.json"
    if not state.is_file():
        raise LayerscopeError(f"{folder}: not a datasets save_to_disk folder (no state.json)")
    tables = []
    for entry in json.loads(state.read_text())["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables).to_pandas()
