"""config.json is untrusted input: its counts are checked against what the checkpoint holds before anything
is built from it.

A model tree is built from the config on the meta device (layerscope.checkpoint.modeltree); weights cost
nothing there, but every block is a Python object, so a config claiming a million layers (or experts)
takes minutes and gigabytes to build although the file holds four.  The counts that multiply — layers
of every stack, at any nesting depth (``text_config.num_hidden_layers``), and experts per layer — must
therefore stay within a bound set by the tensors: ``4 × stored + 64``, where *stored* is the largest
block (or expert) count found in the tensor names and expert tensor shapes.  The bound is loose on
purpose (a checkpoint can hold fewer blocks than its config: one shard of several, or a partial export)
yet keeps the build's cost proportional to the file.  Sizes the tree does not store but some models
precompute tables from at build time (position counts) are clamped for the build only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from layerscope.errors import LayerscopeError

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
                "num_decoder_layers", "n_layers", "num_encoder_layers", "depth", "num_layers_per_stack")
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                 "n_experts")
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length",
                   "original_max_position_embeddings")
BUILD_POSITIONS = 1 << 14  # positions kept for a meta build: enough for every module shape, small for any table
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.)")


def stored_counts(names: Iterable[str], shapes: Iterable[tuple[int, ...]]) -> tuple[int, int]:
    """(largest block count under one prefix, largest expert count) the tensors show."""
    blocks: dict[str, int] = {}
    experts = 0
    for name in names:
        for match in _INDEX.finditer(name):
            prefix, index = name[:match.start()], int(match.group(1))
            blocks[prefix] = max(blocks.get(prefix, 0), index + 1)
            if prefix.endswith("experts"):
                experts = max(experts, index + 1)
    for shape in shapes:
        if len(shape) == 3:  # stacked experts: [E, out, in]
            experts = max(experts, int(shape[0]))
    return max(blocks.values(), default=0), experts


def bound(stored: int) -> int:
    return 4 * stored + 64


def check_config_counts(config: dict, names: list[str], shapes: list[tuple[int, ...]], where: str) -> None:
    """Refuse the first layer or expert count in ``config`` (any nesting) beyond what the tensors can hold."""
    blocks, experts = stored_counts(names, shapes)
    for path, key, value in _int_fields(config):
        if key in LAYER_FIELDS and value > bound(blocks):
            raise LayerscopeError(f"{where}: {path} = {value:,} but the checkpoint holds at most {blocks} blocks in "
                                  f"any stack; a config claiming more than {bound(blocks):,} is refused before "
                                  "anything is built from it")
        if key in EXPERT_FIELDS and value > bound(experts):
            raise LayerscopeError(f"{where}: {path} = {value:,} but the checkpoint holds at most {experts} experts "
                                  f"per layer; a config claiming more than {bound(experts):,} is refused before "
                                  "anything is built from it")


def _int_fields(config: dict, prefix: str = ""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _int_fields(value, path + ".")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield path, key, value


def clamp_for_build(config) -> None:
    """Position counts of a transformers config (and its sub-configs) capped for a meta-device build."""
    seen, stack = set(), [config]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for key, value in list(vars(current).items()):
            if key in POSITION_FIELDS and isinstance(value, int) and not isinstance(value, bool) \
                    and value > BUILD_POSITIONS:
                try:
                    setattr(current, key, BUILD_POSITIONS)
                except (AttributeError, TypeError, ValueError):
                    pass
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                stack.append(value)
