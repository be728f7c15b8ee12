"""Checkpoints and scan tables for the planner tests."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pandas as pd

LLAMA2_7B = {"hidden": 4096, "inter": 11008, "layers": 32, "vocab": 32000}


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, int]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def sparse_checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], config: dict) -> Path:
    """A valid bf16 safetensors header whose data region is a hole: full size, no disk used."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path = folder / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def llama2_7b_header_checkpoint(folder: Path) -> Path:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
           "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}
    return sparse_checkpoint(folder, llama_shapes(4096, 11008, 32, 32000), cfg)


def scan_table(layer_values: list[float], hidden: int = 64, metric: str = "alpha_peak",
               roles=("q", "k", "v", "o", "gate", "up", "down")) -> pd.DataFrame:
    """A hand-made scan table: every projection of layer i has ``metric`` = layer_values[i]."""
    rows = []
    for layer, value in enumerate(layer_values):
        for role in roles:
            in_f, out_f = (hidden, 2 * hidden) if role in ("gate", "up") else \
                (2 * hidden, hidden) if role == "down" else (hidden, hidden)
            rows.append({"kind": "projection", "layer": layer, "role": role,
                         "module": f"model.layers.{layer}.{role}_proj", "in_features": in_f,
                         "out_features": out_f, metric: value, "status": "ok"})
    table = pd.DataFrame(rows)
    table.attrs.update(path="synthetic", architecture="LlamaForCausalLM", model_type="llama", naming="llama",
                       num_layers=len(layer_values), fingerprint="0" * 64, conv1d=False)
    return table
