"""Near-zero fractions of layer and projection outputs, measured with forward hooks.

Streaming: each hooked module keeps a fixed set of running sums (counts, Σ|x|, Σx², a
histogram of log10|x|); no activation is stored, so memory does not grow with the number of
batches.  Padding positions (attention mask 0) are dropped before anything is counted.

Two thresholds are reported for every module:

* ``near_zero_abs_fraction``  share of output entries with |x| <= ``eps`` (absolute; depends on
  the model's scale).
* ``near_zero_fraction``      share of entries with |x| <= ``rel_eps`` × RMS of that token's
  output vector (scale-free).  Default rel_eps = 0.1: for a Gaussian output vector about 8 % of
  entries fall below a tenth of its RMS, so fractions well above that mark a layer whose
  outputs concentrate near zero — HILO's signal that the layer needs little adapter capacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from layerscope.checkpoint.naming import NamingScheme, detect_scheme, scheme_by_name
from layerscope.errors import LayerscopeError
from layerscope.names import DEFAULT_EPS, DEFAULT_REL_EPS  # noqa: F401  (re-exported)

HIST_LOW, HIST_HIGH, HIST_BINS = -8.0, 4.0, 48  # log10|x| from 1e-8 to 1e4, quarter decades


@dataclass
class _Accumulator:
    """Running sums for one hooked module."""

    tokens: int = 0
    entries: int = 0
    near_abs: int = 0
    near_rel: int = 0
    zeros: int = 0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIST_BINS + 2, dtype=torch.float64))

    def add(self, values: torch.Tensor, eps: float, rel_eps: float) -> None:
        """values: (tokens, features) outputs of the non-padding positions."""
        values = values.detach().to(torch.float32)
        magnitude = values.abs()
        token_rms = values.pow(2).mean(dim=-1, keepdim=True).sqrt()
        self.tokens += values.shape[0]
        self.entries += values.numel()
        self.near_abs += int((magnitude <= eps).sum())
        self.near_rel += int((magnitude <= rel_eps * token_rms).sum())
        self.zeros += int((magnitude == 0).sum())
        self.sum_abs += float(magnitude.sum(dtype=torch.float64))
        self.sum_sq += float(values.pow(2).sum(dtype=torch.float64))
        logs = torch.log10(magnitude[magnitude > 0])
        below = int((logs < HIST_LOW).sum())
        above = int((logs > HIST_HIGH).sum())
        inside = torch.histc(logs, bins=HIST_BINS, min=HIST_LOW, max=HIST_HIGH).to(torch.float64).cpu()
        self.hist[0] += below
        self.hist[1:-1] += inside
        self.hist[-1] += above

    def row(self) -> dict:
        entries = max(self.entries, 1)
        return {
            "tokens": self.tokens,
            "entries": self.entries,
            "near_zero_fraction": self.near_rel / entries,
            "near_zero_abs_fraction": self.near_abs / entries,
            "zero_fraction": self.zeros / entries,
            "mean_abs": self.sum_abs / entries,
            "rms": math.sqrt(self.sum_sq / entries),
            "hist_log10": [int(c) for c in self.hist.tolist()],
        }


@dataclass(frozen=True)
class _Target:
    name: str
    layer: int
    role: str
    kind: str  # projection | block


def find_targets(model: nn.Module, scheme: NamingScheme) -> list[_Target]:
    """Every decoder/encoder block and every projection inside one, by the naming table."""
    targets = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            role = scheme.classify(f"{name}.weight", tuple(weight.shape), "F32")
            if role.kind == "projection" and role.layer is not None:
                targets.append(_Target(name, role.layer, role.role, "projection"))
                continue
        layer = scheme.block_layer(name)
        if layer is not None:
            targets.append(_Target(name, layer, "block", "block"))
    if not any(t.kind == "projection" for t in targets):
        raise LayerscopeError("no projection modules found in the model (unsupported architecture?)")
    return targets


def _scheme_for(model: nn.Module, architecture: str | None) -> NamingScheme:
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    names = [f"{n}.weight" for n, _ in model.named_modules()]
    if architecture:
        return scheme_by_name(architecture, config_dict, names)
    return detect_scheme(config_dict, names)


def profile(model: nn.Module, batches: Iterable, *, eps: float = DEFAULT_EPS, rel_eps: float = DEFAULT_REL_EPS,
            device: str | torch.device | None = None, architecture: str | None = None, progress: bool = True,
            total: int | None = None) -> pd.DataFrame:
    """Near-zero statistics of every block and projection output of ``model`` over ``batches``.

    ``batches`` yields dicts with ``input_ids`` (and optionally ``attention_mask``), objects with
    ``as_kwargs(device)``, or bare input-id tensors.  Runs in eval mode under inference_mode.
    """
    if eps < 0 or rel_eps < 0:
        raise LayerscopeError("--eps and --rel-eps must be >= 0")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scheme = _scheme_for(model, architecture)
    targets = find_targets(model, scheme)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    accumulators = {t.name: _Accumulator() for t in targets}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            values = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(values, torch.Tensor) or values.dim() < 2:
                return
            mask = state["mask"]
            if mask is not None and values.dim() == 3 and values.shape[:2] == mask.shape:
                values = values[mask.bool()]
            else:
                values = values.reshape(-1, values.shape[-1])
            accumulators[name].add(values, eps, rel_eps)
        return hook

    modules = dict(model.named_modules())
    handles = [modules[t.name].register_forward_hook(hook_for(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, total=total, desc="activations", unit="batch", disable=(not progress) or None):
                kwargs = _as_kwargs(batch, device)
                state["mask"] = kwargs.get("attention_mask")
                if encoder_decoder:  # teacher forcing on the same text reaches the decoder blocks too
                    kwargs["decoder_input_ids"] = kwargs["input_ids"]
                    if state["mask"] is not None:
                        kwargs["decoder_attention_mask"] = state["mask"]
                model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = [{"layer": t.layer, "module": t.name, "role": t.role, "kind": t.kind, **accumulators[t.name].row()}
            for t in targets]
    table = pd.DataFrame(rows)
    if (table["tokens"] == 0).all():
        raise LayerscopeError("no calibration tokens reached the model (empty batches?)")
    layers_seen = int(table["layer"].max()) + 1
    table.attrs.update(naming=scheme.name, stacks=scheme.stacks, num_layers=scheme.num_layers or layers_seen,
                       eps=eps, rel_eps=rel_eps, hist_low=HIST_LOW, hist_high=HIST_HIGH, hist_bins=HIST_BINS)
    return table


def _as_kwargs(batch, device: torch.device) -> dict[str, torch.Tensor]:
    if hasattr(batch, "as_kwargs"):
        return batch.as_kwargs(device)
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    if isinstance(batch, Mapping) and "input_ids" in batch:  # a dict, or a tokenizer's BatchEncoding
        return {k: torch.as_tensor(batch[k]).to(device) for k in ("input_ids", "attention_mask") if k in batch}
    raise LayerscopeError("each batch must be a tensor of input ids or a mapping with 'input_ids' (a dict, or what "
                          f"a tokenizer returns); got {type(batch).__name__}")


def layer_fractions(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean near-zero fractions over its projections (the planner's input)."""
    projections = table[table["kind"] == "projection"]
    grouped = projections.groupby("layer", sort=True)
    summary = grouped[["near_zero_fraction", "near_zero_abs_fraction", "mean_abs", "rms"]].mean()
    blocks = table[table["kind"] == "block"].set_index("layer")["near_zero_fraction"]
    summary["block_near_zero_fraction"] = blocks.reindex(summary.index)
    summary.insert(0, "num_modules", grouped.size())
    return summary.reset_index()
