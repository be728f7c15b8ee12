"""GGUF files (llama.cpp, ollama, LM Studio) read directly, one tensor at a time.

The ``gguf`` package (ggml-org's own reader) parses the file's metadata and tensor table; layerscope then
checks every entry against the file (offsets inside it, sizes that match the ggml type, sane shapes and
counts) and reads each tensor's bytes with a positional read, dequantizing (:mod:`~layerscope.checkpoint.ggufquant`; every ggml
type that module can decode; the others are refused by name when the file is opened).

Names: GGUF calls tensors ``blk.N.attn_q.weight``; layerscope gives them the names transformers gives the
model it builds from the file, as transformers' loader derives them (gguf's table of GGUF names for the
architecture, applied to the model built on the meta device from the file's config), so layers, roles, plans and PEFT exports work
as for safetensors.  Values: llama.cpp permutes the rows of Q and K in Llama-family files (for its RoPE
layout); layerscope undoes it as transformers does, so weights equal what transformers loads (spectra do
not change under a row permutation either way).  Architectures whose tensors transformers reshapes or
re-splits on load (fused MoE experts, Bloom's fused QKV, GPT-2's transposes, Mamba, T5) are refused by
name with the alternative: ``layerscope convert-gguf`` writes the folder transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerscope.checkpoint.gguflayout import gguf_package, read_layout
from layerscope.errors import LayerscopeError

# GGUF architectures whose tensors transformers converts beyond renaming (its TensorProcessors that reshape,
# split or transpose 2-D weights); Gemma's and Nemotron's processors only shift 1-D norm weights.
CONVERTED_ON_LOAD = frozenset({"qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "bloom", "t5", "t5encoder", "gpt2",
                               "mamba", "lfm2", "minimax-m2"})
# Architectures whose Q/K rows llama.cpp's converter permutes (transformers' LlamaTensorProcessor undoes it).
PERMUTED_QK = frozenset({"llama"})
MAX_TENSORS = 1_000_000
MAX_DIM = 1 << 40


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: GGUF name, ggml type name, shape in PyTorch order (out, in), byte range."""

    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class GGUFTable:
    """A GGUF file parsed once: its tensor entries, architecture and metadata (see :class:`gguflayout.Layout`)."""

    tensors: list[GGUFTensor]
    architecture: str
    values: dict[str, object]
    array_lengths: dict[str, int]


def read_gguf(file: Path) -> GGUFTable:
    """Every tensor entry of ``file`` (its layout checked as llama.cpp checks it, :mod:`gguflayout`) and its
    metadata; the tokenizer's arrays (49k entries in a real file) are skipped by length, not decoded."""
    layout = read_layout(file)
    if len(layout.tensors) > MAX_TENSORS:
        raise LayerscopeError(f"{file}: declares {len(layout.tensors):,} tensors (at most {MAX_TENSORS:,})")
    tensors = []
    for info in layout.tensors:
        if any(d > MAX_DIM for d in info.dims):
            raise LayerscopeError(f"{file}: tensor {info.name!r} has shape {list(info.dims)}: a dimension is too large")
        begin = layout.data_start + info.offset
        tensors.append(GGUFTensor(info.name, info.ggml_type, tuple(reversed(info.dims)), begin, begin + info.nbytes))
    architecture = layout.values.get("general.architecture")
    return GGUFTable(tensors, architecture if isinstance(architecture, str) else "unknown", layout.values,
                     layout.array_lengths)


def read_gguf_table(file: Path) -> tuple[list[GGUFTensor], str]:
    """The tensor entries and the GGUF architecture name (:func:`read_gguf`)."""
    table = read_gguf(file)
    return table.tensors, table.architecture


def _open_reader(file: Path):
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(str(file), "r")
    except Exception as exc:  # noqa: BLE001 - the parser raises ValueError, IndexError, KeyError, ...
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise LayerscopeError(f"{file}: not a readable GGUF file ({type(exc).__name__}: {reason})") from None


def _checked_table(file: Path, reader) -> tuple[list[GGUFTensor], str]:
    gguf = gguf_package()
    size = file.stat().st_size
    if len(reader.tensors) > MAX_TENSORS:
        raise LayerscopeError(f"{file}: declares {len(reader.tensors):,} tensors (at most {MAX_TENSORS:,})")
    architecture = _string_field(reader, "general.architecture") or "unknown"
    tensors = []
    for entry in reader.tensors:
        tensors.append(_checked_entry(gguf, file, size, entry))
    return tensors, architecture


def _checked_entry(gguf, file: Path, size: int, entry) -> GGUFTensor:
    name = entry.name
    dims = [int(d) for d in entry.shape]
    if not dims or any(d <= 0 or d > MAX_DIM for d in dims):
        raise LayerscopeError(f"{file}: tensor {name!r} has shape {dims}")
    block, type_size = gguf.GGML_QUANT_SIZES[entry.tensor_type]
    if dims[0] % block:
        raise LayerscopeError(f"{file}: tensor {name!r}: {dims[0]} values per row is not a multiple of "
                              f"{entry.tensor_type.name}'s block of {block}")
    elements = 1
    for d in dims:
        elements *= d
    expected = elements // block * type_size
    begin = int(entry.data_offset)
    if int(entry.n_bytes) != expected or begin < 0 or begin + expected > size:
        raise LayerscopeError(f"{file}: tensor {name!r} ({entry.tensor_type.name}, {expected:,} bytes at offset "
                              f"{begin:,}) does not lie inside the file ({size:,} bytes; truncated?)")
    return GGUFTensor(name, entry.tensor_type.name, tuple(reversed(dims)), begin, begin + expected)


def _string_field(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError):
        return None


def gguf_config(file: Path, table: GGUFTable) -> dict:
    """The model's config as transformers' ``load_gguf_checkpoint`` derives it from the file's metadata, built
    from the values :func:`read_gguf` already read (transformers' own key tables; its reader would parse the
    file again and decode every tokenizer array)."""
    architecture = table.architecture
    if architecture in CONVERTED_ON_LOAD:
        raise LayerscopeError(f"{file}: GGUF architecture {architecture!r}: transformers reshapes or re-splits its "
                              "tensors on load, which layerscope does not reproduce; convert it once with "
                              f"`layerscope convert-gguf {file.name} FOLDER` and scan the folder")
    mapping, defaults = _transformers_key_tables(file)
    # transformers' own renames: llama.cpp writes Mistral as llama (it tests the name list, hence the equality)
    model_type = "mistral" if "llama" in architecture and table.values.get("general.name") == "mistral" \
        else architecture
    supported = set(mapping) - {"general", "tokenizer"}
    if architecture not in supported and model_type not in supported:
        raise LayerscopeError(f"{file}: transformers cannot derive a config from this GGUF file (architecture "
                              f"{architecture!r}; it loads {', '.join(sorted(supported))})")
    names = {tensor.gguf_name for tensor in table.tensors}
    config: dict = {}
    if "stablelm" in architecture:  # transformers reads these two from the tensor names
        config["use_qkv_bias"] = any(f"attn_{p}.bias" in name for name in names for p in "qkv")
        config["use_parallel_residual"] = not any("ffn_norm" in name for name in names)
    config["tie_word_embeddings"] = "output.weight" not in names or architecture in ("falcon", "bloom")
    for key, value in (defaults.get(model_type) or defaults.get(architecture) or {}).items():
        config.setdefault(key, value)
    for key, value in table.values.items():
        prefix, _, rest = key.replace(architecture, model_type).partition(".")
        target = mapping.get(prefix, {}).get(rest)
        if target is None or target == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, model_type)
        config[target] = value
    for key in table.array_lengths.keys() - table.values.keys():
        prefix, _, rest = key.partition(".")
        if mapping.get(prefix, {}).get(rest) not in (None, -1):
            raise LayerscopeError(f"{file}: metadata {key!r} is an array of {table.array_lengths[key]:,} items, "
                                  "too long for a config field")
    if config.get("model_type") in ("gemma3", "gemma4"):  # the files hold the text backbone only
        config["model_type"] += "_text"
        if config["model_type"] == "gemma4_text":
            config["eos_token_id"] = [1, 106, 50]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in table.array_lengths:
        config["vocab_size"] = table.array_lengths["tokenizer.ggml.tokens"]
    config.pop("_model_name_or_path", None)
    if not config.get("architectures"):  # GGUF files hold language models: the class llama.cpp users load
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
        if causal:
            config["architectures"] = [causal]
    return config


def _transformers_key_tables(file: Path) -> tuple[dict, dict]:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    except ImportError:
        raise LayerscopeError(f"{file}: naming GGUF tensors as transformers does needs transformers: "
                              "pip install 'layerscope[gguf]'") from None
    return GGUF_CONFIG_MAPPING, GGUF_CONFIG_DEFAULTS_MAPPING


def transformers_names(file: Path, config: dict, architecture: str) -> tuple[dict[str, str], dict[str, list[int]]]:
    """GGUF tensor name → the parameter name in the model transformers builds from this file, and → that
    parameter's shape: each parameter of that model (built on the meta device) through gguf's own table of GGUF
    names for the architecture, as transformers' loader maps them (its per-architecture name rewrites only
    concern refused architectures)."""
    from layerscope.checkpoint.modeltree import _meta_model

    gguf = gguf_package()
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise LayerscopeError(f"{file}: GGUF architecture {architecture!r} is unknown to the gguf package")
    try:
        model = _meta_model(config, None)
    except Exception as exc:  # noqa: BLE001 - transformers cannot build this model type
        raise LayerscopeError(f"{file}: transformers cannot build {config.get('model_type')!r} to name its tensors "
                              f"({type(exc).__name__})") from None
    table = gguf.get_tensor_name_map(arch, int(config.get("num_hidden_layers") or 0))
    names: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for hf_name, parameter in model.named_parameters():
        stem, dot, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem) if dot else None
        if gguf_name is not None and f"{gguf_name}.{suffix}" not in names:
            names[f"{gguf_name}.{suffix}"] = hf_name
            shapes[f"{gguf_name}.{suffix}"] = list(parameter.shape)
    return names, shapes


def check_against_model(file: Path, entries: list[GGUFTensor], names: dict[str, str], shapes: dict[str, list[int]],
                        config: dict) -> list[str]:
    """Refuse a tensor whose shape is not its parameter's in the model built from the file's metadata (naming
    both shapes and the config fields behind them); return the weight matrices that model expects and the file
    lacks, as ``live name (GGUF name)`` (transformers would initialise them at random: "missing keys")."""
    for entry in entries:
        expected = shapes.get(entry.gguf_name)
        if expected is not None and list(entry.shape) != expected:
            raise LayerscopeError(
                f"{file}: tensor {entry.gguf_name!r} ({names[entry.gguf_name]}) has shape {list(entry.shape)}, but the "
                f"model built from the file's metadata expects {expected}{_fields_behind(config, expected)}")
    present = {entry.gguf_name for entry in entries}
    return [f"{names[name]} ({name})" for name, shape in shapes.items()
            if len(shape) == 2 and name.endswith(".weight") and name not in present]


def _fields_behind(config: dict, dims: list[int]) -> str:
    fields = [f"{key} = {value}" for key, value in config.items()
              if type(value) is int and value in dims and key.endswith(("_size", "_length", "_dim", "heads"))]
    return f" ({', '.join(fields)})" if fields else ""


def qk_heads(gguf_name: str, config: dict, architecture: str) -> int | None:
    """The head count whose llama.cpp row permutation a Q or K tensor carries (None: not permuted)."""
    if architecture not in PERMUTED_QK or not gguf_name.endswith(".weight"):
        return None
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get(
        "num_attention_heads")
    if ".attn_q." in gguf_name:
        return heads
    if ".attn_k." in gguf_name:
        return kv_heads
    return None


def requantize_gguf(source: Path, target: Path, ggml_type: str, progress: bool = True) -> dict:
    """Write ``source`` again with every 2-D weight re-quantized to ``ggml_type`` (e.g. Q8_0, Q4_0) by
    ``gguf.quants``: a second file to compare with when no original weights exist.  Metadata (config,
    tokenizer) is copied; tensors whose rows do not split into the type's blocks, and 1-D tensors, keep their
    stored type.  Returns counts of what was written; the file appears whole or not at all."""
    import numpy as np
    from tqdm.auto import tqdm

    from layerscope.tables import atomic_write

    gguf = gguf_package()
    try:
        qtype = gguf.GGMLQuantizationType[ggml_type.upper()]
    except KeyError:
        raise LayerscopeError(f"--type {ggml_type}: not a ggml type (e.g. Q8_0, Q4_0, Q4_1, Q5_0)") from None
    entries, _ = read_gguf_table(source)  # the layout checked before gguf's reader walks it
    reader = _open_reader(source)
    entries, architecture = _checked_table(source, reader)
    counts = {"requantized": 0, "kept": 0}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for entry, stored in tqdm(list(zip(entries, reader.tensors)), desc=f"requantize {qtype.name}", unit="tensor",
                                  disable=(not progress) or None):
            values = gguf.quants.dequantize(stored.data, stored.tensor_type)
            if len(entry.shape) >= 2 and entry.shape[-1] % block == 0:
                try:
                    writer.add_tensor(entry.gguf_name, gguf.quants.quantize(values.astype(np.float32), qtype),
                                      raw_dtype=qtype)
                    counts["requantized"] += 1
                    continue
                except NotImplementedError:
                    raise LayerscopeError(f"--type {qtype.name}: the gguf package cannot quantize to it") from None
            writer.add_tensor(entry.gguf_name, np.array(stored.data), raw_dtype=stored.tensor_type)
            counts["kept"] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    if target.suffix != ".gguf":
        raise LayerscopeError(f"--out {target}: a GGUF file name ends in .gguf")
    atomic_write(target, write)
    return counts
