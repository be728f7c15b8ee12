"""MoE checkpoints of today's size: write a Qwen3-30B-A3B-shaped or a gpt-oss-20b-shaped checkpoint and scan it.

    python benchmarks/bench_moe.py qwen3-30b-a3b [--layers 48] [--dir /tmp/bench-moe] [--ww] [--keep]
    python benchmarks/bench_moe.py gpt-oss-20b   [--layers 24] [--dir /tmp/bench-moe] [--ww] [--keep]
    python benchmarks/bench_moe.py --refloor RESULT.json   # the floor measured again for an earlier result

The files have the real shapes and Hugging Face's on-disk layout, with random weights (the timing and memory of a
scan do not depend on the values):

* qwen3-30b-a3b: hidden 2048, 128 experts of 768 per layer stored one by one in bf16
  (``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), attention 32 × 128 query heads and 4 key/value
  heads, a 128-way router, untied 151,936-row embeddings;
* gpt-oss-20b: hidden 2880, 32 experts of 2880 per layer stored fused in MXFP4
  (``mlp.experts.gate_up_proj_blocks`` / ``_scales`` and ``down_proj_*``), 64 × 64 query heads, 8 key/value heads,
  201,088-row embeddings.

One shard per layer.  The scan runs in a child process (``layerscope scan DIR -q``), whose peak RSS is read from
/proc; the floor is Gram (float64, from the stored dtype) + ``eigvalsh`` of the matrices the scan analyses, in
batches of one shape, with the scan's thread count (``floor_seconds``).  ``--ww`` also loads the
cut model with transformers and runs WeightWatcher's ``analyze()`` on it in memory, recording which matrices it
analyses and which it skips.  ``--layers`` cuts the depth (the full models take about 58 GB and 12 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

MODELS = {
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "intermediate_size": 6144, "vocab_size": 151936, "max_position_embeddings": 40960,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "gpt-oss-20b": {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 2880,
                    "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                    "num_local_experts": 32, "num_experts_per_tok": 4, "intermediate_size": 2880,
                    "vocab_size": 201088, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                    "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}},
}


def _bf16(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return (0.02 * torch.randn(*shape, generator=generator)).to(torch.bfloat16)


def attention(c: dict, prefix: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    q, kv, h = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]
    return {f"{prefix}.self_attn.q_proj.weight": _bf16(g, q, h), f"{prefix}.self_attn.k_proj.weight": _bf16(g, kv, h),
            f"{prefix}.self_attn.v_proj.weight": _bf16(g, kv, h), f"{prefix}.self_attn.o_proj.weight": _bf16(g, h, q),
            f"{prefix}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}


def qwen3_layer(c: dict, layer: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    prefix, h, i = f"model.layers.{layer}", c["hidden_size"], c["moe_intermediate_size"]
    out = attention(c, prefix, g)
    out[f"{prefix}.self_attn.q_norm.weight"] = torch.ones(c["head_dim"], dtype=torch.bfloat16)
    out[f"{prefix}.self_attn.k_norm.weight"] = torch.ones(c["head_dim"], dtype=torch.bfloat16)
    out[f"{prefix}.mlp.gate.weight"] = _bf16(g, c["num_experts"], h)
    for e in range(c["num_experts"]):
        out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = _bf16(g, i, h)
        out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = _bf16(g, i, h)
        out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = _bf16(g, h, i)
    return out


def _mxfp4(g: torch.Generator, experts: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 codes for (experts, rows, cols) stored weights: blocks (E, rows, cols/32, 16), scales (E, rows,
    cols/32) around 2^-7."""
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 122, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def gpt_oss_layer(c: dict, layer: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    prefix, h, i, e = f"model.layers.{layer}", c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    out = attention(c, prefix, g)
    out[f"{prefix}.self_attn.sinks"] = torch.zeros(c["num_attention_heads"], dtype=torch.bfloat16)
    out[f"{prefix}.mlp.router.weight"] = _bf16(g, e, h)
    out[f"{prefix}.mlp.router.bias"] = torch.zeros(e, dtype=torch.bfloat16)
    for name, (rows, cols) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
        blocks, scales = _mxfp4(g, e, rows, cols)
        out[f"{prefix}.mlp.experts.{name}_blocks"], out[f"{prefix}.mlp.experts.{name}_scales"] = blocks, scales
        out[f"{prefix}.mlp.experts.{name}_bias"] = torch.zeros(e, rows, dtype=torch.bfloat16)
    return out


def write(model: str, layers: int, folder: Path) -> Path:
    config = {**MODELS[model], "num_hidden_layers": layers}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    make = qwen3_layer if model == "qwen3-30b-a3b" else gpt_oss_layer
    weight_map = {}
    shards = layers + 1
    for layer in range(layers):
        name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        tensors = make(config, layer, g)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    h, vocab = config["hidden_size"], config["vocab_size"]
    last = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    edges = {"model.embed_tokens.weight": _bf16(g, vocab, h), "lm_head.weight": _bf16(g, vocab, h),
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(edges, str(folder / last), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(edges, last))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


SCAN_CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
from common import peak_rss_mib
import layerscope
from layerscope.spectral import threads
started = time.perf_counter()
table = layerscope.scan({folder!r}, estimators=("alpha", "alpha_hill", "alpha_peak"), progress=False)
seconds = time.perf_counter() - started
shapes = [tuple(int(x) for x in s.split("x")) for s in table["shape"]]
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rows": len(table), "threads": threads.cores(None),
                  "shapes": shapes, "dtypes": list(table["dtype"].astype(str)),
                  "kinds": {{k: int(v) for k, v in table["kind"].value_counts().items()}}}}))
"""


def scan_in_child(folder: Path) -> dict:
    code = SCAN_CHILD.format(bench=str(Path(__file__).parent), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def floor_seconds(shapes: list[tuple[int, int]], dtypes: list[str], threads: int) -> tuple[float, list[dict]]:
    """The least any scan can spend: per (shape, dtype), a batch of up to 8 such matrices converted to float64, their
    Grams by one batched matmul and their eigenvalues by one batched ``eigvalsh``, per matrix, times the count.  No
    reading, decoding, fitting or bookkeeping."""
    torch.set_num_threads(threads)
    stored = {"BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.float64}  # MXFP4 experts decode to float64
    parts, total = [], 0.0
    for (shape, dtype), count in Counter(zip(shapes, dtypes)).items():
        batch = min(count, 8 if shape[0] * shape[1] < 50_000_000 else 1)
        weights = torch.randn(batch, *shape).to(stored.get(dtype, torch.bfloat16))
        started = time.perf_counter()
        tall = (weights if shape[0] >= shape[1] else weights.mT).to(torch.float64)
        torch.linalg.eigvalsh(tall.mT @ tall)
        each = (time.perf_counter() - started) / batch
        parts.append({"shape": list(shape), "dtype": dtype, "count": count, "seconds_each": each})
        total += each * count
    return total, parts


def refloor(result_file: Path) -> dict:
    """An earlier result with its floor measured again (this machine, now) from the shapes it recorded."""
    result = json.loads(result_file.read_text())
    shapes = [tuple(p["shape"]) for p in result["floor_parts"] for _ in range(p["count"])]
    dtypes = [p["dtype"] for p in result["floor_parts"] for _ in range(p["count"])]
    floor, parts = floor_seconds(shapes, dtypes, result["threads"])
    edge = sum(p["seconds_each"] * p["count"] for p in parts if p["shape"][0] >= 100_000)
    result.update(floor_seconds=round(floor, 1), floor_parts=parts, scan_over_floor=round(result["scan_seconds"] / floor, 3),
                  floor_seconds_per_layer_excluding_edges=round((floor - edge) / result["layers"], 1),
                  floor_measured=today())
    return result


WW_CHILD = """
import contextlib, io, json, logging, sys, time, warnings
warnings.simplefilter("ignore")
import transformers, weightwatcher
sys.path.insert(0, {bench!r})
from common import peak_rss_mib
model = transformers.AutoModelForCausalLM.from_pretrained({folder!r}, torch_dtype="auto")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
watcher = weightwatcher.WeightWatcher(model=model)
started = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    details = watcher.analyze()
seconds = time.perf_counter() - started
analysed = sorted(details["longname"].astype(str))
params = sorted(n for n, p in model.named_parameters() if p.dim() >= 2)
skipped = [n for n in params if n.removesuffix(".weight") not in set(analysed)]
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "analysed": len(analysed),
                  "skipped": skipped, "analysed_names": analysed[:12]}}))
"""


def weightwatcher_in_child(folder: Path) -> dict:
    code = WW_CHILD.format(bench=str(Path(__file__).parent), folder=str(folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(MODELS), nargs="?", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, help="depth to write (default: the model's)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-moe"))
    parser.add_argument("--ww", action="store_true", help="also run WeightWatcher on the model in memory")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--refloor", type=Path, help="measure the floor again for an earlier result file; no scan")
    args = parser.parse_args()
    if args.refloor is not None:
        print(json.dumps(refloor(args.refloor), indent=1))
        return
    layers = args.layers or MODELS[args.model]["num_hidden_layers"]
    folder = args.dir / f"{args.model}-{layers}L"
    started = time.perf_counter()
    write(args.model, layers, folder)
    written = time.perf_counter() - started
    disk_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    scan = scan_in_child(folder)
    floor, parts = floor_seconds([tuple(s) for s in scan["shapes"]], scan["dtypes"], scan["threads"])
    result = {"benchmark": "moe_checkpoint_scan", "model": args.model, "layers": layers, "disk_gb": round(disk_gb, 2),
              "write_seconds": round(written, 1), "scan_seconds": round(scan["seconds"], 1),
              "scan_peak_rss_mib": round(scan["peak_rss_mib"]), "rows": scan["rows"], "kinds": scan["kinds"],
              "threads": scan["threads"], "floor_seconds": round(floor, 1),
              "scan_over_floor": round(scan["seconds"] / floor, 3) if floor > 0 else math.nan,
              "scan_seconds_per_layer_excluding_edges": None, "floor_parts": parts,
              "machine": machine(), "date": today()}
    edge = sum(p["seconds_each"] * p["count"] for p in parts if p["shape"][0] >= 100_000)
    result["scan_seconds_per_layer_excluding_edges"] = round((scan["seconds"] - edge) / layers, 1)
    result["floor_seconds_per_layer_excluding_edges"] = round((floor - edge) / layers, 1)
    if args.ww:
        result["weightwatcher"] = weightwatcher_in_child(folder)
    if not args.keep:
        shutil.rmtree(folder)
    print(json.dumps(result, indent=1, default=lambda v: int(v) if isinstance(v, np.integer) else str(v)))


if __name__ == "__main__":
    main()
