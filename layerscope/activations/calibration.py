"""Calibration data: read documents, sample them deterministically, pack them into batches.

Documents come from plain text (one per line, or blank-line separated paragraphs when the file
has blank lines), JSONL with a ``text`` field, or the calibration text bundled with layerscope.
They are shuffled with a seed, tokenised without special tokens, joined with the tokenizer's
separator into one stream, cut into chunks, and each chunk wrapped with the model's special
tokens so that every sequence is exactly ``seq_len`` tokens (the last one padded, with its
attention mask at 0 on the padding).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from layerscope.errors import LayerscopeError
from layerscope.strictjson import strict_json

BUNDLED = "bundled calibration text"


def bundled_calibration_text() -> str:
    return resources.files("layerscope.activations").joinpath("calibration.txt").read_text(encoding="utf-8")


def read_documents(path: str | Path | None = None) -> list[str]:
    """Documents from a .txt/.jsonl file, or the bundled calibration text when ``path`` is None."""
    if path is None:
        return _split_text(bundled_calibration_text())
    path = Path(path)
    if not path.is_file():
        raise LayerscopeError(f"--calib {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LayerscopeError(f"--calib {path}: not UTF-8 text (byte {exc.start})") from None
    documents = _read_jsonl(path, text) if path.suffix == ".jsonl" else _split_text(text)
    if not documents:
        raise LayerscopeError(f"--calib {path}: no text in it")
    return documents


def _split_text(text: str) -> list[str]:
    lines = text.splitlines()
    if any(not line.strip() for line in lines) and len(lines) > 1:
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        return paragraphs
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(path: Path, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = strict_json(line.encode("utf-8", "surrogatepass"), f"--calib {path}", f"line {number}")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LayerscopeError(f"--calib {path}: line {number} has no string field 'text'")
        if record["text"].strip():
            documents.append(record["text"].strip())
    return documents


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, seq_len) int64
    attention_mask: torch.Tensor  # (batch, seq_len) int64, 0 on padding

    def as_kwargs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}


def pack(documents: list[str], tokenizer, seq_len: int, max_samples: int | None = None, seed: int = 0) -> list[list[int]]:
    """Token sequences of exactly ``seq_len`` (the last may be shorter: padded later)."""
    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise LayerscopeError(f"--seq-len {seq_len}: too short for the model's {len(prefix) + len(suffix)} special tokens")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(documents[index], add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
    if not stream:
        raise LayerscopeError("calibration text tokenised to nothing")
    sequences = [prefix + stream[i:i + body] + suffix for i in range(0, len(stream), body)]
    return sequences if max_samples is None else sequences[:max_samples]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] … [SEP], <s> …)."""
    bare = tokenizer("word", add_special_tokens=False)["input_ids"]
    full = tokenizer("word", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def batches(sequences: list[list[int]], batch_size: int, seq_len: int, pad_id: int) -> Iterator[Batch]:
    if batch_size < 1:
        raise LayerscopeError(f"--batch-size {batch_size}: must be >= 1")
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = torch.full((len(chunk), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), seq_len), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        yield Batch(ids, mask)
