"""The 2-D matrices one stored tensor contributes to a scan, each with its table identity: the tensor itself, its
experts, its head groups, its fused parts, or a convolution kernel's positions (layerscope.spectral.conv)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from layerscope.checkpoint.naming import NamingScheme, TensorRole
from layerscope.checkpoint.quantization import LogicalTensor
from layerscope.checkpoint.quantization.mxfp4 import ExpertStack
from layerscope.checkpoint.reader import Checkpoint
from layerscope.spectral import conv
from layerscope.spectral.analysis import Matrix
from layerscope.spectral.options import ScanOptions


def matrix_count(info: LogicalTensor, role: TensorRole, scheme: NamingScheme, pool: bool) -> int:
    if role.kind == "conv":
        return 1 if pool else conv.receptive_field(info.shape)
    if role.kind == "expert_stack" or len(info.shape) > 2:
        return math.prod(info.shape[:-2])
    if role.kind == "grouped":
        return head_groups(scheme, role, info.shape[0])
    return 1


def identity(info: LogicalTensor, role: TensorRole) -> dict:
    """The table columns that say which tensor a row is and what the naming scheme made of it."""
    return {
        "name": info.name, "tensor": info.name, "file": info.file.name, "kind": role.kind, "stack": role.stack,
        "layer": role.layer, "stack_layer": role.stack_layer, "role": role.role, "mixer": role.mixer,
        "module": role.module,
        "expert": role.expert, "part": role.adapter_factor, "dtype": info.dtype, "quantization": info.quantization,
        "conv1d": role.conv1d,
    }


def head_groups(scheme: NamingScheme, role: TensorRole, rows: int) -> int:
    """The head groups of a grouped projection whose rows split evenly among them, else 1 (one matrix)."""
    count = scheme.tree.grouped.get(role.module) if scheme.tree is not None else None
    return count if count and count > 1 and rows % count == 0 else 1


def tensor_matrices(
    ckpt: Checkpoint, info: LogicalTensor, role: TensorRole, weight: torch.Tensor, scheme: NamingScheme,
    opts: ScanOptions,
) -> Iterator[Matrix]:
    """The 2-D matrices one tensor contributes: itself, its experts, itself plus its fused parts, or a
    convolution kernel's positions (pooled into one row by default: layerscope.spectral.conv).

    Weights stay in their stored dtype; the Gram computation converts them chunk by chunk.
    """
    base = identity(info, role)
    if role.kind == "conv":
        yield from kernel_matrices(base, weight, opts.pool, opts.conv2d_norm)
        return
    if isinstance(weight, ExpertStack):  # packed experts, decoded one by one as the batches take them
        for j in range(weight.count):
            yield Matrix({**base, "name": f"{info.name}[{j}]", "kind": "expert", "role": role.role, "expert": j},
                         weight.expert(j))
        return
    if weight.dim() > 2:
        experts = weight.reshape(math.prod(weight.shape[:-2]), *weight.shape[-2:])
        for j, matrix in enumerate(experts):
            kind = "expert" if role.kind == "expert_stack" else role.kind
            yield Matrix({**base, "name": f"{info.name}[{j}]", "kind": kind, "role": role.role, "expert": j}, matrix)
        return
    groups = head_groups(scheme, role, weight.shape[0]) if role.kind == "grouped" else 1
    if groups > 1:  # DeepSeek V4's o_a_proj: group g's block of rows is the matrix applied to head group g's input
        for g, block in enumerate(torch.chunk(weight, groups, dim=0)):
            yield Matrix({**base, "name": f"{info.name}[group {g}]", "part": f"group.{g}"}, block.contiguous())
        return
    yield Matrix(dict(base), weight)
    if opts.split_fused and role.role:
        out_dim = 1 if role.conv1d else 0
        parts = scheme.fused_parts(role.role, weight.shape[out_dim], ckpt.config, info.name)
        if not parts:
            return
        for (part, _), chunk in zip(parts, torch.split(weight, [s for _, s in parts], dim=out_dim)):
            row = {**base, "name": f"{info.name}:{part}", "kind": "part", "role": part, "part": part}
            yield Matrix(row, chunk.contiguous())


def kernel_matrices(base: dict, weight: torch.Tensor, pool: bool, conv2d_norm: bool) -> Iterator[Matrix]:
    shape = tuple(weight.shape)
    positions = conv.kernel_matrices(weight).contiguous()
    scale = conv.eigenvalue_scale(shape, pool, conv2d_norm)
    rf = len(positions)
    if pool:
        yield Matrix({**base, "shape": "x".join(map(str, shape)), "rf": rf}, positions, scale=scale)
        return
    for k, matrix in enumerate(positions):
        yield Matrix({**base, "name": f"{base['name']}[{conv.position_label(shape, k)}]", "rf": rf}, matrix,
                     scale=scale)
