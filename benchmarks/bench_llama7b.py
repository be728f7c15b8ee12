"""Scan a synthetic checkpoint with Llama-2-7B shapes: wall time and peak RSS.

    python benchmarks/bench_llama7b.py [--dir benchmarks/_data/llama7b] [--precision auto]

The checkpoint (32 layers: q,k,v,o 4096x4096; gate,up 11008x4096; down 4096x11008; embeddings
and lm_head 32000x4096; bf16; two shards plus model.safetensors.index.json like the real one,
about 13.5 GB) is generated once, tensor by tensor, and never committed.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS = 4096, 11008, 32000, 32
SHARD_OF_LAYER = lambda layer: 1 if layer < 24 else 2  # noqa: E731  (7b-hf splits after layer 23)


def llama7b_layout() -> list[tuple[str, tuple[int, int], int]]:
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN), 1)]
    for i in range(LAYERS):
        shard = SHARD_OF_LAYER(i)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.append((f"model.layers.{i}.self_attn.{proj}.weight", (HIDDEN, HIDDEN), shard))
        tensors.append((f"model.layers.{i}.mlp.gate_proj.weight", (INTER, HIDDEN), shard))
        tensors.append((f"model.layers.{i}.mlp.up_proj.weight", (INTER, HIDDEN), shard))
        tensors.append((f"model.layers.{i}.mlp.down_proj.weight", (HIDDEN, INTER), shard))
        tensors.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,), shard))
        tensors.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,), shard))
    tensors.append(("model.norm.weight", (HIDDEN,), 2))
    tensors.append(("lm_head.weight", (VOCAB, HIDDEN), 2))
    return tensors


def write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """Stream a bf16 safetensors file: header from the shapes, then one tensor at a time."""
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in entries:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=gen) / math.sqrt(shape[1])).to(torch.bfloat16)
            handle.write(tensor.view(torch.int16).numpy().tobytes())


def generate(folder: Path) -> None:
    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    layout = llama7b_layout()
    weight_map = {}
    for shard in (1, 2):
        name = f"model-{shard:05d}-of-00002.safetensors"
        entries = [(n, s) for n, s, sh in layout if sh == shard]
        print(f"writing {name} ({len(entries)} tensors)", flush=True)
        write_shard(folder / name, entries, seed=shard)
        weight_map.update({n: name for n, _ in entries})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": 32, "vocab_size": VOCAB}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent / "_data" / "llama7b")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path("/tmp/llama7b_scan.parquet"))
    args = parser.parse_args()
    generate(args.dir)
    cmd = [sys.executable, "-c", (
        "import sys, json, time; from pathlib import Path; import layerscope;"
        "t = time.perf_counter();"
        f"df = layerscope.scan({str(args.dir)!r}, precision={args.precision!r}, progress=False);"
        "wall = time.perf_counter() - t;"
        f"df.to_parquet({str(args.out)!r});"
        "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0];"
        "print(json.dumps({'wall_s': wall, 'peak_rss_mib': int(hwm.split()[1]) / 1024, 'rows': len(df),"
        " 'failed': int((df.status != 'ok').sum()), 'precision_used': df.precision.value_counts().to_dict()}))"
    )]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report.update(process_wall_s=time.perf_counter() - started, machine=machine(), date=today(),
                  precision=args.precision)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
