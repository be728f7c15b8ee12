"""Map tensor names to (kind, layer, role, module) using the architecture tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from layerscope.checkpoint.architectures import (
    ADAPTER_FACTORS,
    ADAPTER_PREFIXES,
    ARCHITECTURES,
    NON_LAYER_KINDS,
    ROUTER_ROLES,
)
from layerscope.checkpoint.dtypes import FLOATING
from layerscope.errors import LayerscopeError

GENERIC = "generic"
_GENERIC_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<module>.+)$")
_ANY_PREFIX = r"(?:[\w.]*\.)?"

# Kinds whose matrices are adapter targets and enter the per-layer means.
TARGET_KINDS = frozenset({"projection", "expert"})


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is: its kind, and for block tensors the layer, role and module path."""

    name: str
    kind: str  # projection | expert | expert_stack | router | embedding | lm_head | norm | bias | vector | buffer | other
    layer: int | None = None
    role: str | None = None
    module: str | None = None  # e.g. model.layers.3.self_attn.q_proj (adapter prefix removed)
    expert: int | None = None
    conv1d: bool = False  # stored (in, out) like GPT-2's Conv1D
    adapter_factor: str | None = None  # lora_A / lora_B for PEFT adapter files


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    role: str
    stacked: bool


class NamingScheme:
    """Classifies the tensors of one checkpoint according to one architecture entry."""

    def __init__(self, architecture: dict | None):
        self.architecture = architecture

    @property
    def name(self) -> str:
        return self.architecture["name"] if self.architecture else GENERIC

    @property
    def is_generic(self) -> bool:
        return self.architecture is None

    @cached_property
    def _rules(self) -> list[_Rule]:
        if self.architecture is None:
            return []
        prefixes = "|".join(re.escape(p) for p in self.architecture["layer_prefixes"])
        stacked = set(self.architecture.get("stacked_experts", []))
        rules = []
        for module, role in self.architecture["modules"].items():
            module_re = re.escape(module).replace(r"\{expert\}", r"(?P<expert>\d+)")
            pattern = re.compile(
                rf"^(?P<module>{_ANY_PREFIX}(?:{prefixes})\.(?P<layer>\d+)\.{module_re})(?:\.weight)?$"
            )
            rules.append(_Rule(pattern, role, module in stacked))
        return rules

    @cached_property
    def _non_layer(self) -> list[tuple[str, re.Pattern]]:
        return [(kind, re.compile(rx, re.IGNORECASE)) for kind, rx in NON_LAYER_KINDS]

    def classify(self, name: str, shape: tuple[int, ...], dtype: str) -> TensorRole:
        base, factor = _strip_adapter(name)
        if dtype not in FLOATING:
            return TensorRole(name, "buffer")
        if len(shape) < 2:
            return TensorRole(name, self._vector_kind(base))
        for rule in self._rules:
            match = rule.pattern.match(base)
            if match:
                return self._block_role(name, match, rule, factor)
        for kind, pattern in self._non_layer:
            if pattern.search(base):
                return TensorRole(name, kind, adapter_factor=factor)
        generic = _GENERIC_LAYER.match(base.removesuffix(".weight"))
        if generic:
            kind = "projection" if self.is_generic else "other"
            return TensorRole(
                name, kind, layer=int(generic["layer"]), role=generic["module"],
                module=base.removesuffix(".weight"), adapter_factor=factor,
            )
        return TensorRole(name, "other", adapter_factor=factor)

    def _vector_kind(self, base: str) -> str:
        for kind, pattern in self._non_layer:
            if kind == "norm" and pattern.search(base):
                return "norm"
        return "bias" if base.endswith(".bias") else "vector"

    def _block_role(self, name: str, match: re.Match, rule: _Rule, factor: str | None) -> TensorRole:
        expert = match.groupdict().get("expert")
        conv1d = bool(self.architecture.get("conv1d"))
        if rule.role in ROUTER_ROLES:
            kind, role = "router", rule.role
        elif rule.stacked:
            kind, role = "expert_stack", rule.role
        elif expert is not None:
            kind, role = "expert", f"expert.{expert}.{rule.role}"
        else:
            kind, role = "projection", rule.role
        return TensorRole(
            name, kind, layer=int(match["layer"]), role=role, module=match["module"],
            expert=int(expert) if expert is not None else None, conv1d=conv1d, adapter_factor=factor,
        )

    def fused_parts(self, role: str, out_features: int, config: dict, tensor: str) -> list[tuple[str, int]]:
        """(part role, size along the output dim) for a fused role; [] when it is not fused."""
        spec = (self.architecture or {}).get("fused", {}).get(role)
        if spec is None:
            return []
        parts = spec["parts"]
        if spec["split"] == "equal":
            if out_features % len(parts):
                raise LayerscopeError(f"{tensor}: output size {out_features} does not split into {len(parts)} equal parts")
            return [(p, out_features // len(parts)) for p in parts]
        sizes = _qkv_sizes(config, tensor)
        if sum(sizes) != out_features:
            raise LayerscopeError(
                f"{tensor}: output size {out_features} != q+k+v sizes {sizes} from config.json"
            )
        return list(zip(parts, sizes))


def _qkv_sizes(config: dict, tensor: str) -> list[int]:
    for key in ("num_attention_heads", "hidden_size"):
        if not isinstance(config.get(key), int):
            raise LayerscopeError(f"{tensor}: splitting fused qkv needs config.json field {key!r}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _strip_adapter(name: str) -> tuple[str, str | None]:
    """Remove PEFT's ``base_model.model.`` prefix and ``.lora_A`` style factor suffix."""
    base = name
    for prefix in ADAPTER_PREFIXES:
        base = base.removeprefix(prefix)
    for factor in ADAPTER_FACTORS:
        marker = f".{factor}."
        if marker in base:
            head, _, _ = base.partition(marker)
            return head, factor
        if base.endswith(f".{factor}"):
            return base.removesuffix(f".{factor}"), factor
    return base, None


def detect_scheme(config: dict, names: list[str]) -> NamingScheme:
    """Pick the architecture from config.json, else the table entry matching most names."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch["model_types"]:
            return NamingScheme(arch)
    best, best_hits = None, 0
    for arch in ARCHITECTURES:
        scheme = NamingScheme(arch)
        hits = sum(
            1 for n in names
            if any(rule.pattern.match(_strip_adapter(n)[0]) for rule in scheme._rules)
        )
        if hits > best_hits:
            best, best_hits = arch, hits
    return NamingScheme(best)


def scheme_by_name(name: str) -> NamingScheme:
    if name == GENERIC:
        return NamingScheme(None)
    for arch in ARCHITECTURES:
        if arch["name"] == name:
            return NamingScheme(arch)
    known = ", ".join([a["name"] for a in ARCHITECTURES] + [GENERIC])
    raise LayerscopeError(f"--architecture {name!r}: unknown (known: {known})")
