"""torch optimizer parameter groups from a plan's ``optimizer`` section (TempBalance / AlphaDecay)."""

from __future__ import annotations

from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.runtime.apply import adapters


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """One parameter group per planned layer: ``lr × lr_scale`` and ``weight_decay × weight_decay_scale``
    of that layer (1 where the plan's section has no such method).  Pass to any torch optimizer:
    ``torch.optim.AdamW(optimizer_groups(model, 2e-4, 0.01))``."""
    state = getattr(model, "_layerscope", None)
    if state is None:
        raise LayerscopeError("optimizer_groups: apply a plan to the model first (apply_plan)")
    section = state["plan"].document.get("optimizer")
    if section is None:
        raise LayerscopeError("optimizer_groups: the plan has no optimizer section (plan with --optimizer "
                              "tempbalance,alphadecay)")
    scales = {entry["layer"]: entry for entry in section["layers"]}
    groups: dict[int, dict] = {}
    for name, module in adapters(model).items():
        layer = module.layer
        if layer not in scales:
            raise LayerscopeError(f"optimizer_groups: module {name!r} is in layer {layer}, which the plan's "
                                  "optimizer section does not list")
        entry = scales[layer]
        group = groups.setdefault(layer, {"params": [], "layer": layer, "lr": lr * entry.get("lr_scale", 1.0),
                                          "weight_decay": weight_decay * entry.get("weight_decay_scale", 1.0)})
        group["params"].extend(p for p in module.parameters() if p.requires_grad)
    return [groups[layer] for layer in sorted(groups)]
