"""A fine-tuning task read from the files people keep: JSONL, CSV, Parquet, or a ``datasets`` folder.

Sequence classification needs a text column and a label column (strings or integers; strings are
numbered in sorted order); causal-LM needs a text column.  Three disjoint splits:

* train — what the adapters learn from;
* validation — what the comparison chooses with (the learning-rate sweep, the training curves);
* test (``eval_*``) — what the final numbers are measured on, and nothing else.

A DatasetDict folder gives its ``validation`` and ``test`` splits; otherwise the test rows come from
``eval_path`` or a seeded ``eval_fraction`` of the training file, and the validation rows from
``validation_path`` or a seeded ``validation_fraction`` of what is left.  Every problem (a file that does
not parse, a missing column, an empty split, a label the training rows never show) is one
LayerscopeError naming the file and column, raised before any model is built.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.strictjson import json_type, strict_json

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
    validation_texts: list[str] = field(default_factory=list)
    validation_labels: list[int] = field(default_factory=list)
    splits: dict = field(default_factory=dict)  # where each split came from
    train_prompts: list[str] = field(default_factory=list)  # causal LM: context before each text (not scored)
    validation_prompts: list[str] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)

    def split(self, name: str) -> tuple[list[str], list[int], list[str]]:
        """(texts, labels, prompts) of ``train``, ``validation`` or ``test``."""
        if name == "train":
            return self.train_texts, self.train_labels, self.train_prompts
        if name == "validation":
            return self.validation_texts, self.validation_labels, self.validation_prompts
        return self.eval_texts, self.eval_labels, self.eval_prompts

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "train_rows": len(self.train_texts),
                "validation_rows": len(self.validation_texts), "eval_rows": len(self.eval_texts),
                "labels": self.label_names, "splits": self.splits}

    def majority_rate(self) -> float:
        """The test accuracy of always answering the most frequent training label (chance for a classifier)."""
        if not self.eval_labels or not self.train_labels:
            return float("nan")
        most = max(set(self.train_labels), key=self.train_labels.count)
        return self.eval_labels.count(most) / len(self.eval_labels)


def load_task(path: str | Path, kind: str = "classification", *, text_column: str = "text",
              label_column: str = "label", eval_path: str | Path | None = None, eval_fraction: float = 0.2,
              validation_path: str | Path | None = None, validation_fraction: float = 0.15,
              prompt_column: str | None = None, seed: int = 0, max_rows: int | None = None) -> Task:
    """``prompt_column`` (causal LM): a context column; only ``text_column`` (the completion) is scored."""
    if kind not in KINDS:
        raise LayerscopeError(f"--task-kind {kind!r}: expected one of {', '.join(KINDS)}")
    for flag, fraction in (("--eval-fraction", eval_fraction), ("--validation-fraction", validation_fraction)):
        if not 0 < fraction < 1:
            raise LayerscopeError(f"{flag} {fraction}: must be between 0 and 1")
    labels = label_column if kind == "classification" else None
    if prompt_column is not None and kind != "causal-lm":
        raise LayerscopeError(f"--prompt-column {prompt_column}: only for --task-kind causal-lm")
    path = Path(path)
    given = _splits(path, text_column, labels, prompt_column)
    train = given["train"]
    rng_order = list(range(len(train)))
    random.Random(seed).shuffle(rng_order)
    splits = {"train": str(path)}
    held_out = {}
    for split, given_path, fraction in (("test", eval_path, eval_fraction),
                                        ("validation", validation_path, validation_fraction)):
        if given_path is not None:
            held_out[split], splits[split] = _rows(Path(given_path), text_column, labels, prompt_column), str(given_path)
        elif split in given:
            held_out[split], splits[split] = given[split], f"{path} ({split} split)"
        else:  # a seeded share of the training rows that are still unused
            cut = max(1, round(len(rng_order) * fraction))
            held_out[split], rng_order = train.iloc[rng_order[:cut]], rng_order[cut:]
            splits[split] = f"seeded {fraction:g} of {path}"
    test, validation = held_out["test"], held_out["validation"]
    train = train.iloc[sorted(rng_order)] if len(rng_order) != len(train) else train
    if max_rows is not None:
        train = train.iloc[:max_rows]
    if len(train) < 2 or len(test) < 1 or len(validation) < 1:
        raise LayerscopeError(f"{path}: {len(train)} training, {len(validation)} validation and {len(test)} test rows; "
                              "need at least 2, 1 and 1")
    task = Task(kind, list(train["text"]), list(test["text"]), source=str(path),
                validation_texts=list(validation["text"]), splits=splits)
    if prompt_column is not None:
        task.train_prompts, task.validation_prompts, task.eval_prompts = (
            list(rows["prompt"]) for rows in (train, validation, test))
    if kind == "classification":
        names = sorted({str(v) for v in train["label"]}, key=_label_order)
        for where, rows in ((eval_path or path, test), (validation_path or path, validation)):
            unseen = sorted({str(v) for v in rows["label"]} - set(names))
            if unseen:
                raise LayerscopeError(f"{where}: column {label_column!r}: label {unseen[0]!r} never occurs in the "
                                      "training rows")
        if len(names) < 2:
            raise LayerscopeError(f"{path}: column {label_column!r} has one label ({names[0]!r}); a classifier "
                                  "needs two or more")
        index = {name: i for i, name in enumerate(names)}
        task.label_names = names
        task.train_labels = [index[str(v)] for v in train["label"]]
        task.eval_labels = [index[str(v)] for v in test["label"]]
        task.validation_labels = [index[str(v)] for v in validation["label"]]
    return task


def _splits(path: Path, text_column: str, label_column: str | None,
            prompt_column: str | None = None) -> dict[str, pd.DataFrame]:
    """``train`` (and ``validation`` / ``test`` where a DatasetDict folder has them)."""
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LayerscopeError(f"{path / 'dataset_dict.json'}: not a DatasetDict index (no 'splits' list)") from None
        if "train" not in names:
            raise LayerscopeError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(names)})")
        return {name: _rows(path / name, text_column, label_column, prompt_column)
                for name in ("train", "validation", "test") if name in names}
    return {"train": _rows(path, text_column, label_column, prompt_column)}


def _label_order(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _rows(path: Path, text_column: str, label_column: str | None, prompt_column: str | None = None) -> pd.DataFrame:
    table = _read(path)
    for column in (text_column, label_column, prompt_column):
        if column is not None and column not in table.columns:
            raise LayerscopeError(f"{path}: no column {column!r} (columns: {', '.join(map(str, table.columns))})")
    out = pd.DataFrame({"text": table[text_column]})
    if prompt_column is not None:
        out["prompt"] = table[prompt_column]
        bad = out["prompt"].map(lambda t: not isinstance(t, str))
        if bad.any():
            raise LayerscopeError(f"{path}: column {prompt_column!r}: row {int(bad.to_numpy().nonzero()[0][0])} is not text")
    if label_column is not None:
        out["label"] = table[label_column]
    bad = out["text"].map(lambda t: not isinstance(t, str) or not t.strip())  # a completion must say something
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
            return pd.DataFrame(_jsonl_records(path))
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
    except LayerscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser raises its own types
        raise LayerscopeError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    raise LayerscopeError(f"{path}: expected .jsonl, .csv, .parquet or a datasets folder (save_to_disk)")


def _jsonl_records(path: Path) -> list[dict]:
    """One JSON object per non-blank line; a broken line is named by its own line number in the file."""
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        record = strict_json(line, str(path), f"line {number}")
        if not isinstance(record, dict):
            raise LayerscopeError(f"{path}: line {number} is a JSON {json_type(record)}, not an object")
        records.append(record)
    return records


def _read_saved_dataset(folder: Path) -> pd.DataFrame:
    """A ``Dataset.save_to_disk`` folder (Arrow stream files listed in state.json), without needing ``datasets``
    (a DatasetDict's splits are read by :func:`_splits`)."""
    import pyarrow as pa

    state = folder / "state.json"
    if not state.is_file():
        raise LayerscopeError(f"{folder}: not a datasets save_to_disk folder (no state.json)")
    tables = []
    for entry in json.loads(state.read_text())["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables).to_pandas()
