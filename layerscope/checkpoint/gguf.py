"""A GGUF file (llama.cpp) as a Hugging Face folder: model.safetensors, config.json and the tokenizer.

transformers loads a GGUF file (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package),
dequantizing every tensor and undoing llama.cpp's Q/K row permutation, but refuses ``save_pretrained``
on the result.  This writes the loaded model's state dict with safetensors (a tied LM head stored once,
as transformers does), its config with ``architectures`` filled in (GGUF loading leaves it empty) and
the tokenizer, so every layerscope command, the runtime and any trainer can use the model as a folder.
The config drops GGUF's ``quantization_config`` (the weights written are dequantized; transformers would
otherwise treat the folder as a quantized model that cannot be fine-tuned).  The folder records the
source file's size and modification time (``gguf_source.json``): converting the same file again is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from layerscope.errors import LayerscopeError

SOURCE_RECORD = "gguf_source.json"
FORMAT_VERSION = 3  # bumped when what is written changes: older folders are converted again


def materialize_gguf(path: str | Path, folder: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``path`` (a .gguf file) as a Hugging Face folder at ``folder``; returns the folder."""
    path, folder = Path(path), Path(folder)
    if not path.is_file() or path.suffix != ".gguf":
        raise LayerscopeError(f"{path}: not a .gguf file")
    source = {"file": str(path.resolve()), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
              "dtype": dtype, "format": FORMAT_VERSION}
    if _up_to_date(folder, source):
        return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / SOURCE_RECORD).is_file():
        raise LayerscopeError(f"{folder}: exists and is not a folder converted from GGUF; choose an empty folder")
    model, tokenizer = _load(path, dtype)
    from layerscope.checkpoint.reader import open_checkpoint

    # the file's own header fingerprint: a plan of the file is a plan of this folder (export --check-model)
    record = {**source, "fingerprint": open_checkpoint(path).fingerprint()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write(model, tokenizer, scratch, record)
        _usual_permissions(scratch)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(scratch, folder)  # the folder appears whole or not at all
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _usual_permissions(folder: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp and temporary files are private: 0700 / 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _up_to_date(folder: Path, source: dict) -> bool:
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
        return ({k: v for k, v in record.items() if k != "fingerprint"} == source
                and (folder / "model.safetensors").is_file())
    except (OSError, ValueError, AttributeError):
        return False


def converted_from(folder: str | Path) -> str | None:
    """The header fingerprint of the GGUF file ``folder`` was converted from (None: not a converted folder)."""
    try:
        record = json.loads((Path(folder) / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record.get("fingerprint") if isinstance(record, dict) else None


def _load(path: Path, dtype: str):
    try:
        import gguf  # noqa: F401 - transformers needs it; a clear message beats its ImportError
        import torch
        import transformers
    except ImportError as exc:
        raise LayerscopeError(f"{path}: reading GGUF needs the 'gguf' and 'transformers' packages "
                              f"(pip install gguf transformers): {exc}") from None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                      dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LayerscopeError(f"{path}: transformers cannot load this GGUF file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    return model, tokenizer


def _write(model, tokenizer, folder: Path, source: dict) -> None:
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen:
            continue  # a tied weight (the LM head of tied embeddings): stored once, as transformers saves it
        seen.add(storage)
        state[name] = tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)  # the weights written are dequantized: the folder is a plain model
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(folder))
    (folder / SOURCE_RECORD).write_text(json.dumps(source, indent=1) + "\n")
