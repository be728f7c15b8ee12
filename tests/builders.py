"""Tiny checkpoints built by the tests themselves: known spectra, real naming layouts."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def pareto_eigenvalues(n: int, alpha: float, seed: int, xmin: float = 1.0) -> np.ndarray:
    """n draws from the density p(x) ∝ x^-alpha on [xmin, ∞), sorted ascending."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return np.sort(xmin * (1 - u) ** (-1 / (alpha - 1)))


def matrix_with_spectrum(eigs: np.ndarray, n_rows: int, seed: int) -> torch.Tensor:
    """W (n_rows x M) = U diag(sqrt(eigs)) Vᵀ, so the eigenvalues of WᵀW are exactly ``eigs``."""
    m = len(eigs)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n_rows, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.sqrt(torch.as_tensor(eigs, dtype=torch.float64))) @ v.T


def random_matrix(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(dtype)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                     config: dict | None = None) -> Path:
    """Save as model.safetensors, or as ``shards`` files plus model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    per_shard = math.ceil(len(names) / shards)
    for s in range(shards):
        shard_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[s * per_shard:(s + 1) * per_shard]
        save_file({k: tensors[k].contiguous() for k in chunk}, str(folder / shard_name))
        weight_map.update({k: shard_name for k in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file with a hand-made header (for malformed-file tests)."""
    raw = json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def llama_tensors(layers: int = 2, hidden: int = 16, inter: int = 24, vocab: int = 32,
                  dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": random_matrix(vocab, hidden, 0, dtype)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes = {
            "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 2, hidden),
            "self_attn.v_proj": (hidden // 2, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
        }
        for j, (mod, shape) in enumerate(shapes.items()):
            out[f"{p}.{mod}.weight"] = random_matrix(*shape, seed=100 * i + j, dtype=dtype)
        out[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        out[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    out["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    out["lm_head.weight"] = random_matrix(vocab, hidden, 1, dtype)
    return out


LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
                "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2}


def save_tiny_llama(folder: Path, layers: int) -> Path:
    """A tiny Llama built by transformers from a config (random weights, seed 0), saved as safetensors."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder
