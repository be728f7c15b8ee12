"""Parameter accounting from the real module shapes.

Per target module with E experts of rank r, in → out features, top-k routing:
  LoRA experts ("lora")   each expert has its own A (r × in) and B (out × r)
      trainable adapters  E · r · (in + out)       active  min(k, E) · r · (in + out)
  MoR experts ("mor")     one shared A, B; each expert has scaling vectors λ_A (r) and λ_B (out)
      trainable adapters  r · (in + out) + E · (r + out)
      active adapters     r · (in + out) + min(k, E) · (r + out)
  router                  E · in when E > 1 (linear, no bias), trainable and active
A fused expert parameter of the model (``mlp.experts.gate_up_proj``, PEFT's target_parameters) holding n experts
trains one rank-r LoRA per expert: n · r · (in + out), all counted as active too (an upper bound: a token passes
through its routed experts only).
Ratios are reported on adapter parameters (routers excluded, as HILO and MoLA count them)
and, separately, with routers.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerscope.names import counted
from layerscope.planning.inputs import PlanInputs


@dataclass(frozen=True)
class Accounting:
    trainable_adapters: int
    trainable_routers: int
    active_adapters: int
    active_routers: int

    @property
    def trainable_total(self) -> int:
        return self.trainable_adapters + self.trainable_routers

    @property
    def active_total(self) -> int:
        return self.active_adapters + self.active_routers


def module_params(in_features: int, out_features: int, experts: int, rank: int, top_k: int,
                  expert_type: str = "lora", copies: int = 1) -> Accounting:
    """``copies``: the model experts a fused expert parameter holds, each with its own adapter."""
    router = in_features * experts if experts > 1 else 0
    routed = min(top_k, experts)
    shared = rank * (in_features + out_features)
    if expert_type == "mor":
        scales = rank + out_features
        return Accounting(copies * (shared + experts * scales), router, copies * (shared + routed * scales), router)
    return Accounting(copies * experts * shared, router, copies * routed * shared, router)


def planned_module_params(module: dict, expert_type: str) -> Accounting:
    """The counts of one module of a plan (``Plan.modules()``: with its layer's experts and top-k)."""
    return module_params(module["in_features"], module["out_features"], module["experts"], module["rank"],
                         module["top_k"], expert_type, module.get("model_experts", 1))


def account(inputs: PlanInputs, allocations) -> Accounting:
    """Totals over every target module of every allocated layer."""
    totals = [0, 0, 0, 0]
    shapes = inputs.shapes_by_layer
    for alloc in allocations:
        if alloc.experts <= 0:
            continue
        for role, in_f, out_f, copies in shapes.get(alloc.layer, []):
            part = module_params(in_f, out_f, alloc.experts, alloc.rank_for(role, in_f, out_f), alloc.top_k,
                                 alloc.expert_type, copies)
            totals = [t + p for t, p in zip(totals, (part.trainable_adapters, part.trainable_routers,
                                                     part.active_adapters, part.active_routers))]
    return Accounting(*totals)


def baselines(inputs: PlanInputs, reference_rank: int, reference_experts: int, reference_top_k: int = 2) -> dict:
    """The two uniform references every ratio is stated against."""
    shapes = [shape[1:] for layer in inputs.shapes_by_layer.values() for shape in layer]
    return baselines_of(shapes, reference_rank, reference_experts, reference_top_k)


def baselines_of(shapes: list[tuple[int, int, int]], reference_rank: int, reference_experts: int,
                 reference_top_k: int = 2) -> dict:
    """The uniform references over target modules of these (in_features, out_features, copies)."""
    single = sum(copies * reference_rank * (in_f + out_f) for in_f, out_f, copies in shapes)
    moe_routers = sum(in_f for in_f, _, _ in shapes) * reference_experts if reference_experts > 1 else 0
    return {
        "single_lora": {"description": f"one rank-{reference_rank} LoRA per target module",
                        "rank": reference_rank, "trainable": single, "active": single},
        "uniform_moe": {"description": f"{counted(reference_experts, 'expert')} of rank {reference_rank}, "
                                       f"top-{reference_top_k}, in every target module",
                        "experts": reference_experts, "rank": reference_rank, "top_k": reference_top_k,
                        "trainable_adapters": reference_experts * single, "routers": moe_routers,
                        "active_adapters": min(reference_top_k, reference_experts) * single},
    }


def accounting_report(inputs: PlanInputs, allocations, reference_rank: int, reference_experts: int,
                      reference_top_k: int = 2) -> dict:
    return report_of(account(inputs, allocations), baselines(inputs, reference_rank, reference_experts,
                                                             reference_top_k))


def report_of(ours: Accounting, base: dict) -> dict:
    """The plan's ``accounting`` section: its counts, the baselines and the ratios between them."""
    single, moe = base["single_lora"], base["uniform_moe"]
    return {
        "trainable": {"adapters": ours.trainable_adapters, "routers": ours.trainable_routers,
                      "total": ours.trainable_total},
        "active_per_token": {"adapters": ours.active_adapters, "routers": ours.active_routers,
                             "total": ours.active_total},
        "baselines": base,
        "ratios": {
            "trainable_adapters_vs_uniform_moe": ours.trainable_adapters / moe["trainable_adapters"],
            "trainable_adapters_vs_single_lora": ours.trainable_adapters / single["trainable"],
            "active_adapters_vs_single_lora": ours.active_adapters / single["active"],
            "active_adapters_vs_uniform_moe": ours.active_adapters / moe["active_adapters"],
            "trainable_total_vs_uniform_moe": ours.trainable_total / (moe["trainable_adapters"] + moe["routers"]),
        },
    }
