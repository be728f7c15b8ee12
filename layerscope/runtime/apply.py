"""Apply a plan to a torch / transformers model: freeze the base, wrap the planned modules."""

from __future__ import annotations

import types

import pandas as pd
import torch
from torch import nn

from layerscope.checkpoint.modeltree import tree_of_model
from layerscope.checkpoint.naming import detect_scheme
from layerscope.errors import LayerscopeError
from layerscope.planning.plan import Plan
from layerscope.runtime.layers import MoELoraLinear, RoutingContext

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def _model_layer_count(model: nn.Module) -> int | None:
    """Blocks over all stacks (encoder + decoder for T5/BART, towers of composite models), as the scan numbers them."""
    config = getattr(model, "config", None)
    if hasattr(config, "model_type"):  # a transformers model: its own module tree, as the scan saw it
        tree = tree_of_model(model)
        if tree.stacks:
            return tree.num_layers
    if hasattr(config, "to_dict"):
        scheme = detect_scheme(config.to_dict(), [f"{n}.weight" for n, _ in model.named_modules()])
        if scheme.num_layers is not None:
            return scheme.num_layers
    for field in LAYER_COUNT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    return None


def _resolve(model: nn.Module, planned: str, names: list[str]) -> str:
    """The live module name for a planned module path (the model may add a prefix, e.g. 'bert.')."""
    if planned in names:
        return planned
    hits = [n for n in names if n.endswith("." + planned)]
    if len(hits) != 1:
        raise LayerscopeError(f"model has {'no' if not hits else 'several'} module(s) matching planned module "
                              f"{planned!r} (plan made for another architecture?)")
    return hits[0]


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):  # GPT-2: weight is (in, out)
        return weight.shape[0], weight.shape[1]
    raise LayerscopeError(f"module {name!r} is a {type(module).__name__}; only Linear and Conv1D can be adapted")


def apply_plan(model: nn.Module, plan: Plan, verbose: bool = True) -> nn.Module:
    """Freeze every base parameter and replace each planned module with a MoE-LoRA wrapper.

    Refuses a model with another layer count or other module shapes than the plan, and checks
    that the live trainable and active parameter counts equal the plan's accounting.
    """
    if getattr(model, "_layerscope", None) is not None:
        raise LayerscopeError("this model already has a layerscope plan applied")
    fused = [m["name"] for m in plan.modules() if "model_experts" in m]
    if fused:
        raise LayerscopeError(f"{plan.source}: {fused[0]} (and {len(fused) - 1} more) is a fused expert parameter, "
                              "which layerscope.runtime does not wrap; train this plan with PEFT (layerscope export "
                              "--format peft)")
    layers = _model_layer_count(model)
    if layers is not None:
        plan.check_model(layers)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    names = [n for n, _ in model.named_modules()]
    context = RoutingContext()
    lora = plan.document["lora"]
    wrapped: dict[str, MoELoraLinear] = {}
    for spec in plan.modules():
        name = _resolve(model, spec["name"], names)
        base = model.get_submodule(name)
        in_f, out_f = _features(base, name)
        if (in_f, out_f) != (spec["in_features"], spec["out_features"]):
            raise LayerscopeError(f"module {name!r} is {in_f} -> {out_f} but the plan says "
                                  f"{spec['in_features']} -> {spec['out_features']}")
        adapter = MoELoraLinear(base, in_f, out_f, experts=spec["experts"], rank=spec["rank"], top_k=spec["top_k"],
                                lora_alpha=spec["lora_alpha"], dropout=lora["dropout"], init=lora["init"],
                                expert_type=plan.document["expert_type"], context=context)
        adapter.train(base.training)  # a new module starts in training mode; follow the model's mode
        adapter.layer = spec["layer"]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adapter)
        wrapped[name] = adapter
    model._layerscope = {"plan": plan, "modules": wrapped, "context": context,
                         "aux_loss_coef": lora["router_aux_loss_coef"]}
    model.register_forward_pre_hook(_capture_mask(context), with_kwargs=True)
    model.aux_loss = types.MethodType(aux_loss, model)
    _check_accounting(model, plan)
    if verbose:
        print(describe(model))
    return model


def _capture_mask(context: RoutingContext):
    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return hook


def adapters(model: nn.Module) -> dict[str, MoELoraLinear]:
    state = getattr(model, "_layerscope", None)
    if state is None:
        raise LayerscopeError("no layerscope plan is applied to this model (call apply_plan first)")
    return state["modules"]


def live_counts(model: nn.Module) -> dict[str, int]:
    modules = adapters(model).values()
    return {"trainable": sum(m.trainable_parameters() for m in modules),
            "active_per_token": sum(m.active_parameters() for m in modules)}


def _check_accounting(model: nn.Module, plan: Plan) -> None:
    live = live_counts(model)
    planned = {"trainable": plan.accounting["trainable"]["total"],
               "active_per_token": plan.accounting["active_per_token"]["total"]}
    for field in planned:
        if live[field] != planned[field]:
            raise LayerscopeError(f"{field} parameters of the live modules ({live[field]:,}) differ from the "
                                  f"plan's accounting ({planned[field]:,})")
    stray = sum(p.numel() for p in model.parameters() if p.requires_grad) - live["trainable"]
    if stray:
        raise LayerscopeError(f"{stray:,} parameters outside the adapters are trainable")


def describe(model: nn.Module) -> str:
    live = live_counts(model)
    total = sum(p.numel() for p in model.parameters())
    return (f"layerscope: {len(adapters(model))} modules wrapped; trainable {live['trainable']:,} "
            f"({100 * live['trainable'] / total:.2f}% of {total:,}); active per token {live['active_per_token']:,}")


def aux_loss(model: nn.Module) -> torch.Tensor:
    """coefficient × Σ over routed modules of E · Σ_e f_e · P_e from the last forward pass."""
    state = getattr(model, "_layerscope", None)
    if state is None:
        raise LayerscopeError("no layerscope plan is applied to this model")
    terms = [m.last_aux_loss for m in state["modules"].values() if m.last_aux_loss is not None]
    device = next(model.parameters()).device
    if not terms or state["aux_loss_coef"] == 0:
        return torch.zeros((), device=device)
    return state["aux_loss_coef"] * torch.stack(terms).sum()


def router_stats(model: nn.Module, reset: bool = False) -> pd.DataFrame:
    """Share of routed token slots each expert received, per module, since the last reset."""
    rows = []
    for name, module in adapters(model).items():
        load = module.expert_load
        total = float(load.sum())
        for expert, count in enumerate(load.tolist()):
            rows.append({"module": name, "expert": expert, "slots": int(count),
                         "share": count / total if total else float("nan")})
        if reset:
            load.zero_()
    return pd.DataFrame(rows)
