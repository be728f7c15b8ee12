"""Which live parameter holds each expert matrix: the name PEFT's ``target_parameters`` takes.

transformers (≥ 5) holds a MoE layer's experts as 3-D parameters, ``mlp.experts.gate_up_proj`` (experts × 2·I ×
hidden) and ``mlp.experts.down_proj``.  Checkpoints store them per expert (Qwen3-MoE, Mixtral, DeepSeek: fused
on load by transformers' conversion mapping) or already fused (gpt-oss).  PEFT adapts such a parameter with one
LoRA per expert, so a plan of the expert MLPs names these parameters, never the stored per-expert tensors.
"""

from __future__ import annotations

from layerscope.checkpoint.modeltree import ModelTree, tree_for_checkpoint
from layerscope.checkpoint.naming import TensorRole
from layerscope.checkpoint.quantization import LogicalTensor
from layerscope.checkpoint.reader import Checkpoint

EXPERT_KINDS = ("expert", "expert_stack")


def expert_parameters(ckpt: Checkpoint, tree: ModelTree | None,
                      classified: list[tuple[LogicalTensor, TensorRole]]) -> dict[str, str]:
    """stored tensor name → the live parameter holding it, for every expert matrix whose live model holds it in a
    3-D parameter (absent where the live model keeps one Linear per expert, or transformers is not installed).

    A checkpoint whose naming tables are verified is scanned without building its model; here it is built on the
    meta device once, and only when it has per-expert tensors."""
    out: dict[str, str] = {}
    built: ModelTree | None | bool = tree
    for info, role in classified:
        if role.kind not in EXPERT_KINDS:
            continue
        if role.kind == "expert_stack":  # stored as the 3-D parameter itself
            out[info.name] = tree.live_name(info.name) if tree is not None else info.name
        elif info.name in ckpt.fused_into:
            out[info.name] = ckpt.fused_into[info.name]
        else:
            if built is None:
                built = tree_for_checkpoint(ckpt.config, ckpt.path, force=True)[0] or False
            fused = built.fused_parameter(info.name) if built else None
            if fused is not None:
                out[info.name] = fused
    return out
