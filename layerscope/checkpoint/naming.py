"""Map tensor names to (kind, layer, role, module) using the architecture tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from layerscope.checkpoint.architectures import (
    ADAPTER_FACTORS,
    ADAPTER_PREFIXES,
    ARCHITECTURES,
    CONTAINERS,
    EXPERT_PARTS,
    LEAF_ROLES,
    NON_LAYER_KINDS,
    NORM_CONTAINER,
    PART_ROLE_PREFIX,
    ROLE_PREFIX_OF_PART,
    ROUTER_ROLES,
    mixer_of_role,
)
from layerscope.checkpoint.dtypes import FLOATING
from layerscope.checkpoint.modeltree import ModelTree
from layerscope.errors import LayerscopeError

GENERIC = "generic"
MODULE_TREE = "module-tree"  # no naming entry; blocks from transformers' module tree, roles from the shared vocabulary
_GENERIC_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<module>.+)$")
_ANY_PREFIX = r"(?:[\w.]*\.)?"

# Kinds whose matrices are adapter targets and enter the per-layer means.
TARGET_KINDS = frozenset({"projection", "expert"})


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is: its kind, and for block tensors the layer, role and module path."""

    name: str
    # projection | expert | expert_stack | grouped | router | conv | embedding | lm_head | norm | bias | vector |
    # buffer | param | other
    kind: str
    layer: int | None = None  # position in depth order over all stacks
    role: str | None = None
    module: str | None = None  # live module path, e.g. model.layers.3.self_attn.q_proj (adapter prefix removed)
    expert: int | None = None
    conv1d: bool = False  # stored (in, out) like GPT-2's Conv1D
    adapter_factor: str | None = None  # lora_A / lora_B for PEFT adapter files
    stack: str | None = None  # decoder | encoder | vision | audio ...
    stack_layer: int | None = None  # block index inside its stack
    tower: str | None = None  # vision | audio ... for a block of a non-language sub-model

    @property
    def mixer(self) -> str | None:
        return mixer_of_role(self.role) if self.kind in ("projection", "part", "grouped") else None


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    stack: str
    module: str
    role: str
    stacked: bool
    transposed: bool


class NamingScheme:
    """Classifies the tensors of one checkpoint according to one architecture entry.

    ``stack_depths`` gives each stack's block count (from config.json, else from the names),
    so blocks of a later stack are numbered after those of the earlier ones.
    """

    def __init__(self, architecture: dict | None, stack_depths: dict[str, int] | None = None,
                 tree: ModelTree | None = None):
        self.architecture = architecture
        self.stack_depths = stack_depths or {}
        self.tree = tree  # the live module tree: blocks and live names come from it when present

    @property
    def name(self) -> str:
        if self.architecture:
            return self.architecture["name"]
        return MODULE_TREE if self.tree is not None else GENERIC

    @property
    def is_generic(self) -> bool:
        return self.architecture is None and self.tree is None

    @property
    def stacks(self) -> list[str]:
        if self.tree is not None:
            return [s.name for s in self.tree.stacks]
        return [s["stack"] for s in self.architecture["stacks"]] if self.architecture else []

    @property
    def towers(self) -> list[str]:
        """Stacks of vision/audio sub-models (never planned unless asked for)."""
        return [s.name for s in self.tree.stacks if s.is_tower] if self.tree is not None else []

    def stack_offset(self, stack: str) -> int:
        offset = 0
        for name in self.stacks:
            if name == stack:
                return offset
            offset += self.stack_depths.get(name, 0)
        return offset

    @property
    def num_layers(self) -> int | None:
        if self.tree is not None:
            return self.tree.num_layers or None
        depths = [self.stack_depths.get(s) for s in self.stacks]
        return sum(depths) if depths and all(d is not None for d in depths) else None

    @cached_property
    def _relative_rules(self) -> list[tuple[re.Pattern, str, bool, bool]]:
        """(block-relative pattern, role, stacked, transposed) from the naming entry's modules."""
        if self.architecture is None:
            return []
        stacked = set(self.architecture.get("stacked_experts", []))
        transposed = self.architecture.get("transposed", [])
        return [(re.compile("^" + re.escape(module).replace(r"\{expert\}", r"(?P<expert>\d+)") + "$"), role,
                 module in stacked, transposed == "*" or module in transposed)
                for module, role in self.architecture["modules"].items()]

    @cached_property
    def _rules(self) -> list[_Rule]:
        if self.architecture is None:
            return []
        stacked = set(self.architecture.get("stacked_experts", []))
        transposed = self.architecture.get("transposed", [])
        rules = []
        for stack in self.architecture["stacks"]:
            prefixes = "|".join(re.escape(p) for p in sorted(stack["prefixes"], key=len, reverse=True))
            for module, role in self.architecture["modules"].items():
                module_re = re.escape(module).replace(r"\{expert\}", r"(?P<expert>\d+)")
                pattern = re.compile(
                    rf"^(?P<module>{_ANY_PREFIX}(?:{prefixes})\.(?P<layer>\d+)\.{module_re})(?:\.weight)?$"
                )
                rules.append(_Rule(pattern, stack["stack"], module, role, module in stacked,
                                   transposed == "*" or module in transposed))
        return rules

    @cached_property
    def _non_layer(self) -> list[tuple[str, re.Pattern]]:
        return [(kind, re.compile(rx, re.IGNORECASE)) for kind, rx in NON_LAYER_KINDS]

    def classify(self, name: str, shape: tuple[int, ...], dtype: str) -> TensorRole:
        base, factor = _strip_adapter(name)
        if dtype not in FLOATING:
            return TensorRole(name, "buffer")
        if self.tree is not None:
            return self._classify_live(name, base, shape, factor)
        if len(shape) < 2 or _is_bias(base):
            return TensorRole(name, self._vector_kind(base))
        for rule in self._rules:
            match = rule.pattern.match(base)
            if match:
                return self._block_role(name, match, rule, factor)
        if is_kernel(shape):
            return TensorRole(name, "conv", module=base.removesuffix(".weight"), adapter_factor=factor)
        for kind, pattern in self._non_layer:
            if pattern.search(base):
                return TensorRole(name, kind, adapter_factor=factor)
        generic = _GENERIC_LAYER.match(base.removesuffix(".weight"))
        if generic:
            kind = "projection" if self.is_generic else "other"
            return TensorRole(
                name, kind, layer=int(generic["layer"]), role=generic["module"],
                module=base.removesuffix(".weight"), adapter_factor=factor, stack_layer=int(generic["layer"]),
            )
        return TensorRole(name, "other", adapter_factor=factor)

    def _classify_live(self, name: str, base: str, shape: tuple[int, ...], factor: str | None) -> TensorRole:
        """Blocks and names from the live module tree; roles from the naming entry, else the shared vocabulary."""
        live = self.tree.live_name(base)
        module = live.removesuffix(".weight")
        if len(shape) < 2 or _is_bias(live):
            return TensorRole(name, self._vector_kind(live))
        hit = self.tree.block_of(module)
        if hit is None and len(shape) >= 3:  # a patch-embedding or audio convolution kernel: no matrix
            return TensorRole(name, "conv" if not self.tree.is_linear(module) else "other", module=module)
        if hit is None:
            for kind, pattern in self._non_layer:
                if pattern.search(live):
                    return TensorRole(name, kind, module=module, adapter_factor=factor)
            return TensorRole(name, "other", module=module, adapter_factor=factor)
        stack, index, relative = hit
        place = dict(layer=self.tree.offset(stack) + index, module=module, adapter_factor=factor,
                     stack=stack.name, stack_layer=index, tower=stack.tower)
        container, _, leaf = module.rpartition(".")
        if re.search(NORM_CONTAINER, container.lower()):  # an adaptive norm's conditioning Linear
            return TensorRole(name, "norm", **place)
        found = self._role_in_block(relative, len(shape), context=stack.path)
        if found is None and module in self.tree.expert_stacks:  # JetMoE's ParallelExperts: experts, stacked
            vocabulary = shared_vocabulary_role(relative)
            found = (vocabulary[0], None, True, False) if vocabulary else ("experts", None, True, False)
        linear = self.tree.is_linear(module)
        if leaf in ("gate", "router") and f"{container}.experts" in self.tree.modules:
            found = ("router", None, False, False)  # the gate beside the experts routes to them
        if found is None:
            if linear:
                return TensorRole(name, "other", **place)  # a Linear nothing names: reported as unmapped
            kind = "conv" if "conv" in relative.rsplit(".", 1)[-1] or is_kernel(shape) else "param"
            return TensorRole(name, kind, **place)
        role, expert, stacked, transposed = found
        conv1d = transposed or module in self.tree.conv1d
        if role in ROUTER_ROLES:
            return TensorRole(name, "router", role=role, conv1d=conv1d, **place)
        if stacked or (len(shape) >= 3 and expert is None):
            return TensorRole(name, "expert_stack", role=role, conv1d=conv1d, **place)
        if expert is not None:
            return TensorRole(name, "expert", role=role, expert=expert, conv1d=conv1d, **place)
        if module in self.tree.grouped:  # DeepSeek V4's o_a_proj: a projection applied per head group
            return TensorRole(name, "grouped", role=role, **place)
        if not linear:  # a weight of no Linear layer (an SSM's A_log, a scale matrix): never an adapter target
            return TensorRole(name, "param", role=role, **place)
        return TensorRole(name, "projection", role=role, conv1d=conv1d, **place)

    def _role_in_block(self, relative: str, ndim: int, context: str = "") -> tuple[str, int | None, bool, bool] | None:
        """(role, expert, stacked, transposed) of a block-relative path, or None when nothing names it.

        ``context`` (the stack's path) stands in for the container when the block is itself one
        (``merger.mlp.0.linear_1``: the block ``mlp.0`` has no sub-container)."""
        for pattern, role, stacked, transposed in self._relative_rules:
            match = pattern.match(relative)
            if match:
                expert = match.groupdict().get("expert")
                return role, int(expert) if expert is not None else None, stacked, transposed
        found = shared_vocabulary_role(relative if "." in relative or not context else f"{context}.{relative}")
        if found is None:
            return None
        role, expert, in_experts = found
        if ndim >= 3 and not in_experts and expert is None:
            return None  # a 3-D tensor outside an experts container: a kernel, not a projection
        return role, expert, ndim >= 3 and in_experts, False

    def matches(self, name: str) -> bool:
        """Whether a block rule of this architecture names the tensor (used to detect the layout)."""
        base = _strip_adapter(name)[0]
        return any(rule.pattern.match(base) for rule in self._rules)

    def block_layer(self, module_name: str) -> int | None:
        """Depth position of a block module (``model.layers.3`` → 3), None for anything else."""
        if self.tree is not None:
            for stack in self.tree.stacks:
                match = re.fullmatch(re.escape(stack.path) + r"\.(\d+)", module_name)
                if match:
                    return self.tree.offset(stack) + int(match.group(1))
            return None
        for stack in (self.architecture or {}).get("stacks", []):
            prefixes = "|".join(re.escape(p) for p in stack["prefixes"])
            match = re.match(rf"^{_ANY_PREFIX}(?:{prefixes})\.(\d+)$", module_name)
            if match:
                return self.stack_offset(stack["stack"]) + int(match.group(1))
        return None

    def _vector_kind(self, base: str) -> str:
        for kind, pattern in self._non_layer:
            if kind == "norm" and pattern.search(base):
                return "norm"
        return "bias" if _is_bias(base) else "vector"

    def _block_role(self, name: str, match: re.Match, rule: _Rule, factor: str | None) -> TensorRole:
        expert = match.groupdict().get("expert")
        if rule.role in ROUTER_ROLES:
            kind, role = "router", rule.role
        elif rule.stacked:
            kind, role = "expert_stack", rule.role
        elif expert is not None:
            kind, role = "expert", rule.role
        else:
            kind, role = "projection", rule.role
        stack_layer = int(match["layer"])
        return TensorRole(
            name, kind, layer=self.stack_offset(rule.stack) + stack_layer, role=role, module=match["module"],
            expert=int(expert) if expert is not None else None, conv1d=rule.transposed, adapter_factor=factor,
            stack=rule.stack, stack_layer=stack_layer,
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


def _config_int(config: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _qkv_sizes(config: dict, tensor: str) -> list[int]:
    attn = config.get("attn_config") if isinstance(config.get("attn_config"), dict) else {}
    heads = _config_int(config, ("num_attention_heads", "n_head", "n_heads"))
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"))
    if not heads or not hidden:
        raise LayerscopeError(f"{tensor}: splitting fused qkv needs positive config.json fields for the head count "
                              "and hidden size (num_attention_heads/n_head, hidden_size/n_embd)")
    kv_heads = _config_int(config, ("num_key_value_heads", "n_head_kv", "num_kv_heads")) or _config_int(
        attn, ("kv_n_heads",))
    if config.get("multi_query") is True:
        kv_heads = 1
    kv_heads = kv_heads or heads
    head_dim = _config_int(config, ("head_dim",)) or hidden // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


MAX_KERNEL = 31  # a stored 3-D weight whose last side is at most this (and below its first) is read as a Conv1d


def is_kernel(shape: tuple[int, ...]) -> bool:
    """Whether a weight nothing else names is a convolution kernel: 4-D ``(out, in, kh, kw)``, or 3-D ``(out, in,
    k)`` with a short last side (a stack of experts ends in a hidden size)."""
    return len(shape) == 4 or (len(shape) == 3 and shape[-1] <= MAX_KERNEL and shape[-1] < shape[0])


def _is_bias(base: str) -> bool:
    return base.endswith(".bias") or base.endswith("_bias")


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


def shared_vocabulary_role(relative: str) -> tuple[str, int | None, bool] | None:
    """(role, expert index, inside an experts container) from the vocabulary most families share."""
    container, _, leaf = relative.rpartition(".")
    lowered = container.lower()
    expert_match = re.search(r"(?:^|\.)experts\.(\d+)$", container)
    expert = int(expert_match.group(1)) if expert_match else None
    part = next((p for p, rx in CONTAINERS if re.search(rx, lowered)), None)
    in_experts = part in EXPERT_PARTS
    if part == "router":
        return "router", None, False
    key = leaf.lower()
    role = LEAF_ROLES.get(part or "", {}).get(key) or LEAF_ROLES["*"].get(key)
    if role is None:
        prefix = PART_ROLE_PREFIX.get(part or "")
        if prefix is None:
            return None
        role = prefix + key.removesuffix("_proj")
    elif part in ROLE_PREFIX_OF_PART and role not in ROUTER_ROLES and not role.startswith(ROLE_PREFIX_OF_PART[part]):
        role = ROLE_PREFIX_OF_PART[part] + role
    return role, expert, in_experts


def detect_scheme(config: dict, names: list[str], tree: ModelTree | None = None) -> NamingScheme:
    """Pick the architecture from config.json, else the table entry matching most names.

    With the live module ``tree`` the blocks, stacks and module names come from it, and the entry
    (or the shared vocabulary when no entry covers the model type) names the roles.
    """
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch["model_types"]:
            return bind_scheme(arch, config, names, tree)
    if tree is not None:
        return NamingScheme(None, tree=tree)
    best, best_hits = None, 0
    for arch in ARCHITECTURES:
        hits = sum(1 for n in names if NamingScheme(arch).matches(n))
        if hits > best_hits:
            best, best_hits = arch, hits
    return bind_scheme(best, config, names)


def bind_scheme(architecture: dict | None, config: dict, names: list[str],
                tree: ModelTree | None = None) -> NamingScheme:
    """A scheme for one checkpoint: each stack's depth from config.json, else from the block names."""
    if tree is not None:
        return NamingScheme(architecture, {s.name: s.depth for s in tree.stacks}, tree)
    if architecture is None:
        return NamingScheme(None)
    seen: dict[str, int] = {}
    unbound = NamingScheme(architecture)
    for name in names:
        base = _strip_adapter(name)[0]
        for rule in unbound._rules:
            match = rule.pattern.match(base)
            if match:
                seen[rule.stack] = max(seen.get(rule.stack, 0), int(match["layer"]) + 1)
                break
    depths = {}
    for stack in architecture["stacks"]:
        configured = _config_int(config, tuple(stack["count"]))
        found = seen.get(stack["stack"])
        if configured is not None and found is not None and found > configured:
            configured = None  # config.json disagrees with the tensors; trust the tensors
        if found is None and names:  # the checkpoint has no block of this stack (BartForCausalLM: no encoder)
            configured = None
        depth = configured if configured is not None else found
        if depth is not None:
            depths[stack["stack"]] = depth
    return NamingScheme(architecture, depths)


def scheme_by_name(name: str, config: dict | None = None, names: list[str] | None = None,
                   tree: ModelTree | None = None) -> NamingScheme:
    if name == GENERIC:
        return NamingScheme(None)
    if name == MODULE_TREE and tree is not None:
        return NamingScheme(None, tree=tree)
    for arch in ARCHITECTURES:
        if arch["name"] == name:
            return bind_scheme(arch, config or {}, names or [], tree)
    known = ", ".join([a["name"] for a in ARCHITECTURES] + [GENERIC])
    raise LayerscopeError(f"--architecture {name!r}: unknown (known: {known})")
