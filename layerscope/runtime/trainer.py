"""Training a plan with transformers' Trainer (or TRL's SFTTrainer): the balancing loss, router telemetry
and adapter checkpoints.

```python
from layerscope.runtime.trainer import LayerscopeTrainer, RouterTelemetry

trainer = LayerscopeTrainer(model=model, args=args, train_dataset=data,
                            callbacks=[RouterTelemetry(collapse_share=0.9)])
trainer.train()
```

* ``LayerscopeTrainer`` (or ``AuxLossMixin`` in front of any Trainer subclass:
  ``class MySFT(AuxLossMixin, SFTTrainer)``) adds ``model.aux_loss()`` — the plan's
  ``router_aux_loss_coef`` × the Mixtral load-balancing term of every routed module — to the loss the
  Trainer computes, so it reaches the routers' gradients.
* ``RouterTelemetry`` every ``every`` steps (default: the Trainer's ``logging_steps``) adds to
  ``trainer.state.log_history`` (and so to ``trainer_state.json``), per layer, the share of routed
  token slots each expert got since the last window (``router/layer3/expert0_share``), the largest
  share and the normalised routing entropy (1 = uniform, 0 = one expert); it warns
  (``RouterCollapseWarning``) when one expert of a layer takes more than ``collapse_share`` of the
  slots for ``collapse_windows`` windows in a row; and at every Trainer checkpoint it writes
  ``save_adapters`` output to ``checkpoint-N/layerscope``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

from transformers import Trainer, TrainerCallback

from layerscope.runtime.apply import adapters
from layerscope.runtime.io import save_adapters


class RouterCollapseWarning(UserWarning):
    """One expert of a layer takes (almost) every routed token."""


def _unwrapped(model):
    """The module the plan was applied to: the model itself, or the first submodule carrying the plan
    (a task head around an adapted encoder, a DDP/accelerate wrapper)."""
    if getattr(model, "_layerscope", None) is not None:
        return model
    return next((m for m in model.modules() if getattr(m, "_layerscope", None) is not None), model)


class AuxLossMixin:
    """Adds the applied plan's balancing loss (``model.aux_loss()``) to the Trainer's training loss."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        target = _unwrapped(model)
        if getattr(target, "_layerscope", None) is not None:
            loss = loss + target.aux_loss().to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


class LayerscopeTrainer(AuxLossMixin, Trainer):
    """transformers.Trainer with the plan's balancing loss added to the training loss."""


def layer_router_stats(model, reset: bool = True) -> dict[int, dict[str, float]]:
    """Per layer with routed modules: each expert's share of the routed slots, the largest share and the
    routing entropy normalised by log(E), pooled over the layer's modules since the last reset."""
    loads: dict[int, list[float]] = {}
    for module in adapters(model).values():
        if module.router is None:
            continue
        counts = module.expert_load.tolist()
        pooled = loads.setdefault(module.layer, [0.0] * len(counts))
        for expert, count in enumerate(counts):
            pooled[expert] += count
        if reset:
            module.expert_load.zero_()
    stats = {}
    for layer, counts in sorted(loads.items()):
        total = sum(counts)
        if total == 0:
            continue
        shares = [c / total for c in counts]
        entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))
        stats[layer] = {"shares": shares, "max_share": max(shares), "entropy": entropy}
    return stats


class RouterTelemetry(TrainerCallback):
    def __init__(self, every: int | None = None, collapse_share: float = 0.9, collapse_windows: int = 3,
                 save: bool = True):
        if not 0 < collapse_share <= 1 or collapse_windows < 1:
            raise ValueError("collapse_share must be in (0, 1] and collapse_windows >= 1")
        self.every, self.collapse_share, self.collapse_windows, self.save = every, collapse_share, collapse_windows, save
        self._streak: dict[int, int] = defaultdict(int)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.every or max(1, int(args.logging_steps) if args.logging_steps >= 1 else 1)
        if model is None or state.global_step % every:
            return control
        stats = layer_router_stats(_unwrapped(model), reset=True)
        entry = {"step": state.global_step}
        for layer, layer_stats in stats.items():
            prefix = f"router/layer{layer}"
            entry[f"{prefix}/max_share"] = layer_stats["max_share"]
            entry[f"{prefix}/entropy"] = layer_stats["entropy"]
            for expert, share in enumerate(layer_stats["shares"]):
                entry[f"{prefix}/expert{expert}_share"] = share
            self._check_collapse(layer, layer_stats, state.global_step)
        if len(entry) > 1:
            state.log_history.append(entry)
        return control

    def _check_collapse(self, layer: int, stats: dict, step: int) -> None:
        if stats["max_share"] > self.collapse_share:
            self._streak[layer] += 1
            if self._streak[layer] == self.collapse_windows:
                expert = stats["shares"].index(stats["max_share"])
                warnings.warn(f"layer {layer}: expert {expert} took {stats['max_share']:.0%} of the routed tokens for "
                              f"{self.collapse_windows} logging windows (step {step}); its experts are collapsing "
                              "(raise router_aux_loss_coef or check the router's learning rate)",
                              RouterCollapseWarning, stacklevel=2)
        else:
            self._streak[layer] = 0

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save and model is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "layerscope"
            save_adapters(_unwrapped(model), folder)
        return control
