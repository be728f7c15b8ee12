"""First-order importance of every target matrix on the user's own rows: Σ |W ⊙ ∂L/∂W|.

The product of a weight and its gradient is the loss change if that weight were removed, to first
order; summed over a matrix and averaged over a few batches it is one number per matrix, and the
mean over a layer's target matrices is the layer's score.  AdaLoRA tracks the same quantity (per
singular triplet, smoothed) while it trains; measured once before training it becomes a static plan
any trainer can consume (``plan --strategy sensitivity``).

Only the target matrices get gradients (the rest of the model stays frozen), the model runs in eval
mode (no dropout: the score is of the model as loaded), and the batches must carry labels so that the
model returns its loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from layerscope.activations.profile import _scheme_for, find_targets
from layerscope.errors import LayerscopeError

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def sensitivity(model: torch.nn.Module, batches: Iterable, *, device: str | torch.device | None = None,
                architecture: str | None = None, progress: bool = True, total: int | None = None) -> pd.DataFrame:
    """Per target matrix: ``sensitivity`` = mean over ``batches`` of Σ|W ⊙ ∂L/∂W| (rows: layer, module, role)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = [t for t in find_targets(model, _scheme_for(model, architecture)) if t.kind == "projection"]
    modules = dict(model.named_modules())
    weights = {t.name: modules[t.name].weight for t in targets}
    sums = dict.fromkeys(weights, 0.0)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    seen = 0
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in tqdm(batches, total=total, desc="sensitivity", unit="batch", disable=(not progress) or None):
            loss = _loss(model, batch, device)
            gradients = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, weight), gradient in zip(weights.items(), gradients):
                if gradient is not None:
                    sums[name] += float((weight.detach() * gradient).abs().sum(dtype=torch.float64))
            seen += 1
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        model.train(was_training)
    if seen == 0:
        raise LayerscopeError("no batches reached the model: the sensitivity needs at least one batch with labels")
    rows = [{"layer": t.layer, "module": t.name, "role": t.role, "kind": "projection",
             "sensitivity": sums[t.name] / seen} for t in targets]
    table = pd.DataFrame(rows)
    table.attrs.update(batches=seen, measure="mean over batches of sum |W * dL/dW| per matrix")
    return table


def layer_sensitivity(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: the mean score over its target matrices (the planner's v_i) and its share of the total."""
    grouped = table.groupby("layer", sort=True)["sensitivity"]
    summary = pd.DataFrame({"num_modules": grouped.size(), "sensitivity": grouped.mean()}).reset_index()
    summary["share"] = summary["sensitivity"] / summary["sensitivity"].sum()
    return summary


def _loss(model: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise LayerscopeError("each sensitivity batch must be a mapping with 'input_ids' and 'labels' (the loss "
                              "needs the task's targets)")
    kwargs = {k: torch.as_tensor(batch[k]).to(device) for k in INPUT_KEYS if k in batch}
    loss = getattr(model(**kwargs), "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise LayerscopeError(f"{type(model).__name__} returned no scalar loss for a labelled batch (a task head "
                              "is needed: a classification or causal-LM model)")
    if not torch.isfinite(loss):
        raise LayerscopeError(f"the loss of a sensitivity batch is {float(loss)}: the scores would be meaningless")
    return loss
