"""The CUDA path, checked and timed where a GPU exists (CI has none): scan, plan, runtime.

    python benchmarks/gpu_check.py [--hidden 4096] [--layers 4] [--out gpu.json]

1. A Llama-shaped bf16 checkpoint (random weights; ``--hidden`` wide, ``--layers`` blocks, MLP 2.6875x)
   is scanned on ``cuda`` (``auto`` = guarded float32) and on ``cuda --precision f64``, and on the CPU in
   float64 for the first block only; every alpha is compared with the float64 CPU value of the same matrix.
2. A tiny transformers Llama gets a 4-expert top-2 MoE-LoRA plan with the runtime on the GPU; a few
   AdamW steps must lower the loss, and the adapters' output must equal the base at initialisation.
Reports seconds, matrices per second, peak GPU memory and the largest alpha differences as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    from safetensors.torch import save_file

    inter = int(hidden * 2.6875) // 64 * 64
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            tensors[f"model.layers.{i}.{name}.weight"] = (torch.randn(*shape, generator=gen) / hidden**0.5).to(
                torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": 32000}))
    return folder


def scan_check(hidden: int, layers: int) -> dict:
    import layerscope

    with tempfile.TemporaryDirectory() as tmp:
        folder = llama_checkpoint(Path(tmp) / "model", hidden, layers)
        layerscope.scan(folder, device="cuda", progress=False, include=r"layers\.0\.self_attn\.q_proj")  # warm-up
        report = {}
        tables = {}
        for precision in ("auto", "f64"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            started = time.perf_counter()
            tables[precision] = layerscope.scan(folder, device="cuda", precision=precision, progress=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            report[f"cuda_{precision}"] = {"seconds": round(seconds, 3), "matrices": len(tables[precision]),
                                           "matrices_per_s": round(len(tables[precision]) / seconds, 2),
                                           "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                                           "precision_used": tables[precision]["precision"].value_counts().to_dict()}
        started = time.perf_counter()
        cpu = layerscope.scan(folder, device="cpu", precision="f64", include=r"layers\.0\.", progress=False)
        report["cpu_f64_first_block"] = {"seconds": round(time.perf_counter() - started, 3), "matrices": len(cpu)}
        reference = cpu.set_index("name")
        for precision, table in tables.items():
            shared = table.set_index("name").loc[reference.index]
            report[f"cuda_{precision}"]["max_abs_diff_vs_cpu_f64"] = {
                column: float((shared[column] - reference[column]).abs().max())
                for column in ("alpha", "alpha_hill", "alpha_peak", "log_norm")}
    return report


def runtime_check() -> dict:
    import transformers

    import layerscope
    from layerscope.runtime import apply_plan

    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp)
        plan = layerscope.plan(tmp, "uniform", experts=4, top_k=2, rank=8, progress=False)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp).cuda()
        ids = torch.randint(0, 256, (4, 32), device="cuda")
        with torch.no_grad():
            before = model(input_ids=ids).logits
        apply_plan(model, plan, verbose=False)
        with torch.no_grad():
            same = float((model(input_ids=ids).logits - before).abs().max())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids).loss + model.aux_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return {"output_change_at_init": same, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_fell": losses[-1] < losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "scan": scan_check(args.hidden, args.layers), "runtime": runtime_check()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
