"""Load a local Hugging Face model folder (never the network) and profile it on calibration text."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from layerscope.activations.calibration import BUNDLED, batches, pack, read_documents
from layerscope.activations.profile import DEFAULT_EPS, DEFAULT_REL_EPS, profile
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.errors import LayerscopeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LayerscopeError("activations need transformers: pip install 'layerscope[hf]'") from None
    return transformers


def load_model(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local folder with its own config.json and tokenizer files, or from a GGUF file
    (transformers dequantizes it and builds the tokenizer the file carries)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        return _load_gguf(folder, device, dtype)
    if not folder.is_dir():
        raise LayerscopeError(f"{folder}: not a model folder or .gguf file")
    if not (folder / "config.json").is_file():
        raise LayerscopeError(f"{folder}: no config.json (activations need a transformers model folder)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LayerscopeError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if dtype not in DTYPES:
        raise LayerscopeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    transformers = _transformers()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype])
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"{folder}: cannot load model/tokenizer ({str(exc).splitlines()[0]})") from None
    return model.to(device), tokenizer


def _load_gguf(file: Path, device: str, dtype: str):
    if dtype not in DTYPES:
        raise LayerscopeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    transformers = _transformers()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                                  dtype=DTYPES[dtype])
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, ImportError) as exc:
        raise LayerscopeError(f"{file}: transformers cannot load this GGUF file ({str(exc).splitlines()[0]})") from None
    return model.to(device), tokenizer


def max_positions(model, tokenizer) -> int | None:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**6:
        limits.append(model_max)
    limits = [x for x in limits if isinstance(x, int)]
    return min(limits) if limits else None


def measure(folder: str | Path, calib: str | Path | None = None, *, max_samples: int | None = 128,
            seq_len: int = 256, batch_size: int = 8, seed: int = 0, eps: float = DEFAULT_EPS,
            rel_eps: float = DEFAULT_REL_EPS, device: str = "cpu", dtype: str = "float32",
            progress: bool = True) -> pd.DataFrame:
    """Per-module near-zero fractions of a local model on calibration text (bundled by default)."""
    from layerscope.spectral.esd import resolve_device

    if batch_size < 1:
        raise LayerscopeError(f"--batch-size {batch_size}: must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise LayerscopeError(f"--max-samples {max_samples}: must be >= 1 (leave it out for the default)")
    device = str(resolve_device(device))
    documents = read_documents(calib)
    model, tokenizer = load_model(folder, device, dtype)
    limit = max_positions(model, tokenizer)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        raise LayerscopeError(f"--seq-len {seq_len}: must be between 2 and the model's maximum of {limit}")
    sequences = pack(documents, tokenizer, seq_len, max_samples, seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_batches = -(-len(sequences) // batch_size)
    table = profile(model, batches(sequences, batch_size, seq_len, pad_id), eps=eps, rel_eps=rel_eps,
                    device=device, progress=progress, total=n_batches)
    ckpt = open_checkpoint(folder)
    table.attrs.update(path=str(folder), fingerprint=ckpt.fingerprint(),
                       calibration=str(calib) if calib else BUNDLED, samples=len(sequences), seq_len=seq_len,
                       batch_size=batch_size, seed=seed, dtype=dtype, device=device)
    return table
