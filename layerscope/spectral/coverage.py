"""What a scan covers, said in full: the config's depth against the blocks the file holds, and every weight
that gets no row, with the reason (a scan never drops a weight without saying so)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from layerscope.checkpoint.naming import TensorRole
from layerscope.checkpoint.quantization import LogicalTensor
from layerscope.checkpoint.reader import Checkpoint
from layerscope.errors import LayerscopeError
from layerscope.spectral import conv

# Every matrix is analysed, planned or not: weights of no Linear layer (param), projections applied per group
# (grouped), adaptive-norm Linears (norm).
ANALYSED_KINDS = frozenset({"projection", "expert", "expert_stack", "grouped", "router", "embedding", "lm_head", "other",
                            "param", "norm", "conv"})
NOT_ANALYSED_REASONS = {"filtered": "left out by --include/--exclude"}



LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
EXTRA_LAYER_FIELDS = ("num_nextn_predict_layers",)  # DeepSeek V3, GLM-4.5: multi-token-prediction blocks after the rest


def config_depth(ckpt: Checkpoint, classified: list[tuple[LogicalTensor, TensorRole]]) -> tuple[list[str], int | None]:
    """The config's block count against the blocks the checkpoint's one language stack holds.

    More blocks in the file than the config counts is refused: plans would be made for blocks the model
    transformers builds from that config does not have.  Fewer: returns the weights of the absent blocks, named
    from the config's arithmetic (the deepest present block's weights at every absent index), and the number of
    blocks present; otherwise ``([], None)``."""
    if not ckpt.files or ckpt.config.get("is_encoder_decoder") is True:
        return [], None
    field = next((key for key in LAYER_COUNT_FIELDS if type(ckpt.config.get(key)) is int), None)
    blocks: dict[str, tuple[int, str]] = {}
    for info, role in classified:
        if role.stack is not None and role.tower is None and role.stack_layer is not None:
            deepest = blocks.get(role.stack)
            if deepest is None or role.stack_layer > deepest[0]:
                blocks[role.stack] = (role.stack_layer, info.name)
    if field is None or len(blocks) != 1:
        return [], None
    (stack, (deepest, example)), = blocks.items()
    extra = sum(v for key in EXTRA_LAYER_FIELDS if type(v := ckpt.config.get(key)) is int and v > 0)
    claimed = ckpt.config[field]
    where = Path(ckpt.path) / "config.json" if Path(ckpt.path).is_dir() else f"{ckpt.path} (its metadata)"
    if deepest + 1 > claimed + extra:
        raise LayerscopeError(f"{where}: {field} = {claimed} but the checkpoint holds {deepest + 1} blocks "
                              f"({example}); the model built from this config would have {claimed}")
    if deepest + 1 >= claimed:
        return [], None
    template = [info.name for info, role in classified
                if role.stack == stack and role.tower is None and role.stack_layer == deepest and len(info.shape) >= 2]
    absent = [_at_block(name, deepest, index) for index in range(deepest + 1, claimed) for name in template]
    return [name for name in absent if name], deepest + 1


def _at_block(name: str, present: int, index: int) -> str | None:
    """``name`` of block ``present`` as block ``index`` would call it (its block number, as a dotted segment)."""
    parts = name.split(".")
    at = [i for i, part in enumerate(parts) if part == str(present)]
    if not at:
        return None
    parts[at[0]] = str(index)
    return ".".join(parts)


def listed_once(missing: list[str], *more: list[str]) -> list[str]:
    """``missing`` with ``more`` added, each weight once (a GGUF entry reads ``name (gguf name)``)."""
    out = list(missing)
    seen = {entry.split(" (", 1)[0] for entry in out}
    for names in more:
        for name in names:
            if name.split(" (", 1)[0] not in seen:
                seen.add(name.split(" (", 1)[0])
                out.append(name)
    return out


def not_analysed(classified: list[tuple[LogicalTensor, TensorRole]], selection: Selection) -> list[dict]:
    """Every weight (a floating tensor of two or more dimensions) that has no row, with the reason: the scan
    never drops one without saying so."""
    out = []
    for info, role in classified:
        if len(info.shape) < 2 or role.kind == "buffer":
            continue
        reason = selection.reason(info, role)
        if reason is not None:
            out.append({"tensor": info.name, "shape": "x".join(map(str, info.shape)), "reason": reason})
    return out


def depth_description(attrs: dict) -> str:
    """``6 layers``; with towers ``8 blocks (language_model 4, vision_tower 4: tower)``, so a reader never takes
    the checkpoint's block count for the language model's depth."""
    stacks = attrs.get("stack_depths") or []
    claimed = attrs.get("config_num_layers")
    if claimed:  # the config counts more blocks than the file holds
        return f"{attrs.get('num_layers')} layers (the config counts {claimed}: blocks {attrs.get('num_layers')}–" \
               f"{claimed - 1} are absent)"
    if len(stacks) < 2:
        return f"{attrs.get('num_layers')} layers"
    parts = ", ".join(f"{s['name']} {s['depth']}" + (": tower" if s.get("tower") else "") for s in stacks)
    return f"{attrs.get('num_layers')} blocks ({parts})"


def not_analysed_line(attrs: dict) -> str | None:
    """``7 weights not analysed: 4 convolution kernels, 3 …`` (None when every weight has a row)."""
    skipped = attrs.get("not_analysed") or []
    if not skipped:
        return None
    counts: dict[str, int] = {}
    for entry in skipped:
        counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    parts = ", ".join(f"{count} {reason}{'s' if count > 1 and not reason.startswith('left') else ''}"
                      for reason, count in sorted(counts.items(), key=lambda item: -item[1]))
    return f"{len(skipped)} weight{'s' if len(skipped) > 1 else ''} not analysed: {parts}"


def wanted(info: LogicalTensor, role: TensorRole, selection: Selection) -> bool:
    return selection.reason(info, role) is None


@dataclass(frozen=True)
class Selection:
    """Which weights a scan analyses: by name (regular expressions), kind, role, block, and size (WeightWatcher's
    ``min_evals``, ``max_evals`` and ``max_N``).  By default every weight matrix is analysed."""

    include: str | None = None
    exclude: str | None = None
    kinds: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    min_evals: int | None = None
    max_evals: int | None = None
    max_n: int | None = None
    pool: bool = True  # a convolution kernel is one row (its positions' eigenvalues pooled), else one per position

    @property
    def narrowed(self) -> bool:
        return any(value not in (None, ()) for key, value in vars(self).items() if key != "pool")

    def reason(self, info: LogicalTensor, role: TensorRole) -> str | None:
        """Why the weight gets no row, or None when it is analysed."""
        if role.kind not in ANALYSED_KINDS or len(info.shape) < 2:
            return NOT_ANALYSED_REASONS.get(role.kind, f"kind {role.kind}")
        if role.kind == "conv" and not conv.has_matrix(info.shape):
            return ("depthwise convolution kernel (one input channel: no matrix)" if len(info.shape) in (3, 4)
                    else "convolution kernel of 3 or more spatial sides")
        if (self.include and not re.search(self.include, info.name)) or \
                (self.exclude and re.search(self.exclude, info.name)):
            return NOT_ANALYSED_REASONS["filtered"]
        kind = "expert" if role.kind == "expert_stack" else role.kind
        if self.kinds and kind not in self.kinds:
            return "left out by --kinds"
        if self.roles and role.role not in self.roles:
            return "left out by --roles"
        if self.layers and role.layer not in self.layers:
            return "left out by --layers"
        n_rows, m_cols = max(info.shape[-2:]), min(info.shape[-2:])
        if role.kind == "conv":  # WeightWatcher counts a pooled kernel's eigenvalues over its receptive field
            n_rows, m_cols = max(info.shape[:2]), min(info.shape[:2]) * (conv.receptive_field(info.shape)
                                                                          if self.pool else 1)
        if self.min_evals is not None and m_cols < self.min_evals:
            return "fewer eigenvalues than --min-evals"
        if self.max_evals is not None and m_cols > self.max_evals:
            return "more eigenvalues than --max-evals"
        if self.max_n is not None and n_rows > self.max_n:
            return "larger side above --max-n"
        return None


def described(selected: list[tuple[LogicalTensor, TensorRole]], pool: bool = True) -> list[dict]:
    """The rows a scan of ``selected`` would have, without their numbers: name, kind, layer, role, shape, N, M
    (a stack of experts listed expert by expert; a convolution kernel as one row, or one per position)."""
    rows = []
    for info, role in selected:
        if role.kind == "conv":
            rows += _described_kernel(info, role, pool)
            continue
        count = math.prod(info.shape[:-2]) if len(info.shape) > 2 else 1
        rows_, cols_ = info.shape[-2:]
        for j in range(count):
            stacked = len(info.shape) > 2
            rows.append({"name": f"{info.name}[{j}]" if stacked else info.name, "tensor": info.name,
                         "kind": "expert" if role.kind == "expert_stack" else role.kind, "layer": role.layer,
                         "role": role.role, "expert": j if stacked else role.expert, "dtype": info.dtype,
                         "shape": f"{rows_}x{cols_}", "N": max(rows_, cols_), "M": min(rows_, cols_),
                         "num_evals": min(rows_, cols_)})
    return rows


def _described_kernel(info: LogicalTensor, role: TensorRole, pool: bool) -> list[dict]:
    shape = tuple(info.shape)
    rf = conv.receptive_field(shape)
    n_rows, m_cols = max(shape[:2]), min(shape[:2])
    common = {"tensor": info.name, "kind": "conv", "layer": role.layer, "role": role.role, "expert": None,
              "dtype": info.dtype, "N": n_rows, "M": m_cols}
    if pool:
        return [{"name": info.name, **common, "shape": "x".join(map(str, shape)), "num_evals": m_cols * rf, "rf": rf}]
    return [{"name": f"{info.name}[{conv.position_label(shape, k)}]", **common, "shape": f"{shape[0]}x{shape[1]}",
             "num_evals": m_cols, "rf": rf} for k in range(rf)]
