"""The module tree transformers builds for a checkpoint: live names, block stacks, towers.

transformers renames many checkpoints' keys on load (its conversion mappings; composite wrappers
such as Gemma 3's ``language_model.model.layers`` → ``model.language_model.layers``), and PEFT, the
runtime and every trainer see the *live* names.  The tree is built on the meta device (no memory,
no weights), so this costs the same for any model size.  Its block stacks are the outermost
``nn.ModuleList``s of blocks that hold Linear layers; a stack owned by a vision or audio
sub-model is a *tower*.

transformers is optional: without it, or for a checkpoint it cannot build (custom code, an unknown
type), :func:`tree_for_checkpoint` returns ``None`` and the naming tables alone are used.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from layerscope.checkpoint.architectures import (
    ARCHITECTURES,
    LANGUAGE_SUB_CONFIGS,
    NOT_PROJECTION_CLASSES,
    TOWER_KEYWORDS,
)
from layerscope.checkpoint.configguard import EXPERT_FIELDS, clamp_for_build

LANGUAGE = None  # the ``tower`` of a language-model stack


@dataclass(frozen=True)
class BlockStack:
    """One sequence of blocks: ``path.0``, ``path.1`` ... in the live model."""

    name: str  # decoder | encoder | vision | audio | ...
    path: str  # live ModuleList path, e.g. model.language_model.layers
    depth: int
    tower: str | None = LANGUAGE  # vision | audio | ... for a non-language sub-model

    @property
    def is_tower(self) -> bool:
        return self.tower is not LANGUAGE


@dataclass
class ModelTree:
    """Live block stacks (language stacks first, then towers), Linear shapes, and the key renaming."""

    stacks: list[BlockStack]
    linears: dict[str, tuple[int, int]]  # live module path → (in, out) of plain Linear/Conv1D layers
    class_name: str | None = None
    is_encoder_decoder: bool = False
    conv1d: frozenset[str] = frozenset()  # modules stored (in, out), like GPT-2's Conv1D
    modules: frozenset[str] = frozenset()  # every module path
    # checkpoint key → (live key, fused parameter): a key fused or split on load has no live parameter of its
    # own; its live key is then the key after the plain renamings, and the second item names the parameter.
    rename: Callable[[str], tuple[str, str | None]] = field(default=lambda key: (key, None), repr=False)
    expert_stacks: frozenset[str] = frozenset()  # non-Linear modules holding one weight matrix per expert
    # Linear subclasses that apply their weight in groups (not y = Wx) → their group count (None: unknown)
    grouped: dict[str, int | None] = field(default_factory=dict)

    def offset(self, stack: BlockStack) -> int:
        return sum(s.depth for s in self.stacks[: self.stacks.index(stack)])

    @property
    def num_layers(self) -> int:
        return sum(s.depth for s in self.stacks)

    @property
    def language_layers(self) -> int:
        return sum(s.depth for s in self.stacks if not s.is_tower)

    def block_of(self, module: str) -> tuple[BlockStack, int, str] | None:
        """(stack, index in the stack, path inside the block) of a live module or parameter path."""
        best = None
        for stack in self.stacks:
            prefix = stack.path + "." if stack.path else ""
            if module.startswith(prefix):
                match = re.match(r"(\d+)\.(.+)$", module[len(prefix):])
                if match and (best is None or len(stack.path) > len(best[0].path)):
                    best = (stack, int(match.group(1)), match.group(2))
        return best

    def live_name(self, checkpoint_name: str) -> str:
        """The live parameter name of a stored tensor (after transformers' renamings, before any fusing)."""
        return self.rename(checkpoint_name)[0]

    def fused_parameter(self, checkpoint_name: str) -> str | None:
        """The live parameter transformers merges a stored tensor into on load (its fused experts), else None."""
        return self.rename(checkpoint_name)[1]

    def is_linear(self, module: str) -> bool:
        """A plain Linear in the live model; a block beyond the configured depth (the tensors have more
        blocks than config.json says) is judged by the same path in the stack's other blocks."""
        if module in self.linears:
            return True
        hit = self.block_of(module)
        if hit is None or hit[1] < hit[0].depth:
            return False
        stack, _, relative = hit
        return any(f"{stack.path}.{i}.{relative}" in self.linears for i in range(stack.depth))


PEFT_TASKS: list[tuple[str, str]] = [  # model class name suffix → PEFT task_type
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("Model", "FEATURE_EXTRACTION"),
]


def peft_task(class_name: str | None, is_encoder_decoder: bool = False) -> str | None:
    """PEFT's task_type for a transformers model class (None where PEFT has none, e.g. masked LM)."""
    if not class_name:
        return None
    if class_name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM"
    return next((task for suffix, task in PEFT_TASKS if class_name.endswith(suffix)), None)


def model_facts(scheme, tree: ModelTree | None, config: dict | None = None) -> dict:
    """Scan/plan attributes that describe the block stacks, the towers and the model's task (PEFT's task type
    from the built class, else from config.json's ``architectures``)."""
    facts = {"naming": scheme.name, "stacks": scheme.stacks, "towers": scheme.towers,
             "conv1d": (scheme.architecture or {}).get("transposed") == "*" or bool(tree and tree.conv1d)}
    if tree is not None:
        facts["stack_depths"] = [{"name": s.name, "depth": s.depth, "tower": s.tower} for s in tree.stacks]
        facts["task"] = peft_task(tree.class_name, tree.is_encoder_decoder)
    elif config:
        architectures = config.get("architectures") or [None]
        facts["task"] = peft_task(architectures[0] if isinstance(architectures[0], str) else None,
                                  config.get("is_encoder_decoder") is True)
    return facts


def tree_of_model(model, rename: Callable[[str], tuple[str, str | None]] | None = None) -> ModelTree:
    """The tree of a built torch model (a live one, or one on the meta device)."""
    from torch import nn

    config = getattr(model, "config", None)
    lists = _block_lists(model)
    towers = [_tower_of(model, path, config) for path, _ in lists]
    language = [(p, m) for (p, m), t in zip(lists, towers) if t is LANGUAGE]
    named = []
    for path, blocks in language:
        name = _language_stack_name(path, model, len(language))
        if any(s.name == name for s in named):  # a second list of the same kind: name it by its own path
            name = f"{name}.{_distinct_segment(path, [p for p, _ in language])}"
        named.append(BlockStack(name, path, len(blocks)))
    tower_lists = [(p, m, t) for (p, m), t in zip(lists, towers) if t is not LANGUAGE]
    for path, blocks, tower in tower_lists:
        siblings = [p for p, _, t in tower_lists if t == tower]
        name = tower if len(siblings) == 1 else f"{tower}.{_distinct_segment(path, siblings)}"
        named.append(BlockStack(name, path, len(blocks), tower))
    linears, conv1d = {}, set()
    experts = next((v for key in EXPERT_FIELDS if type(v := getattr(config, key, None)) is int and v > 1), None)
    stacks, grouped = set(), {}
    for name, module in model.named_modules():
        # Some Linear subclasses compute something else from their weight (DeepSeek V4's grouped o_a_proj):
        # wrapping them as y = Wx + BAx would be wrong, so they are no projections.
        if isinstance(module, nn.Linear) and re.search(NOT_PROJECTION_CLASSES, type(module).__name__):
            count = getattr(module, "n_groups", None)
            grouped[name] = count if type(count) is int and count > 0 else None
        elif isinstance(module, nn.Linear):
            linears[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            linears[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
            conv1d.add(name)
        elif _holds_expert_stack(module, experts):
            stacks.add(name)
    return ModelTree(named, linears, type(model).__name__, bool(getattr(config, "is_encoder_decoder", False)),
                     frozenset(conv1d), frozenset(name for name, _ in model.named_modules()),
                     rename or (lambda key: (key, None)), frozenset(stacks), grouped)


def _holds_expert_stack(module, experts: int | None) -> bool:
    """A module (not a Linear) whose own weight is one matrix per expert: (experts, out, in), as JetMoE's
    ParallelExperts holds its feed-forward and attention experts."""
    weight = getattr(module, "weight", None)
    own = dict(module.named_parameters(recurse=False))
    return experts is not None and weight is not None and own.get("weight") is weight and weight.dim() == 3 \
        and int(weight.shape[0]) == experts


def _block_lists(model) -> list[tuple[str, object]]:
    """Outermost ModuleLists whose items are blocks (containers holding Linear layers), in registration order."""
    from torch import nn

    found: list[tuple[str, object]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        items = list(module)
        if not items or any(isinstance(item, nn.Linear) or type(item).__name__ == "Conv1D" for item in items):
            continue  # a list of bare layers (heads, projections) is no block stack
        if any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for item in items for m in item.modules()):
            found.append((name, module))
    return found


def _tower_of(model, path: str, config) -> str | None:
    """The sub-config name (``vision``, ``audio`` ...) of the sub-model that owns a block list, None for language."""
    owner_config = None
    parts = path.split(".")
    for depth in range(len(parts), 0, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        if hasattr(owner, "config") and owner is not model:
            owner_config = owner.config
            break
    if config is not None and owner_config is not None and owner_config is not config:
        for attr, value in vars(config).items():
            if attr.endswith("_config") and value is not None and hasattr(value, "model_type"):
                same = value is owner_config or value.model_type == getattr(owner_config, "model_type", None)
                if same:
                    tower = attr.removesuffix("_config")
                    if tower in LANGUAGE_SUB_CONFIGS:
                        return LANGUAGE
                    kind = _keyword_tower(f"{path}.{getattr(owner_config, 'model_type', '')}".replace("_", "."))
                    return kind or tower  # an "encoder" sub-model of a speech model is its audio tower
    return _keyword_tower(path) or LANGUAGE


def _keyword_tower(text: str) -> str | None:
    lowered = text.lower()
    return next((tower for tower, pattern in TOWER_KEYWORDS.items() if re.search(pattern, lowered)), None)


def _language_stack_name(path: str, model, count: int) -> str:
    segments = path.split(".")
    if count > 1:
        for name in ("encoder", "decoder"):
            if name in segments or any(s.startswith(name) for s in segments):
                return name
    is_causal = type(model).__name__.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel"))
    if "encoder" in segments and not getattr(getattr(model, "config", None), "is_decoder", False) and not is_causal:
        return "encoder"
    return "decoder" if is_causal or "decoder" in segments else "encoder"


def _distinct_segment(path: str, siblings: list[str]) -> str:
    others = [set(s.split(".")) for s in siblings if s != path]
    unique = [seg for seg in path.split(".") if all(seg not in o for o in others) and not seg.isdigit()]
    return unique[-1] if unique else str(siblings.index(path))


TABLE_VERIFIED = "naming table (checked against transformers' module tree for this model type)"


def table_verified(config: dict) -> bool:
    """A single-model checkpoint of a type the naming tables claim: its stored names are the live ones and the
    tables map its blocks exactly (tests/test_architectures.py builds each such type with transformers), so the
    meta-device build (and transformers' 3-4 s import) can be skipped."""
    claimed = {t for arch in ARCHITECTURES for t in arch["model_types"]}
    composite = any(isinstance(v, dict) and "model_type" in v for v in config.values())
    return config.get("model_type") in claimed and not composite


def tree_for_checkpoint(config: dict, folder: Path | None, force: bool = False) -> tuple[ModelTree | None, str | None]:
    """(tree, None), or (None, why not): the naming tables already cover the type (unless ``force``),
    transformers is absent, or it cannot build this model."""
    if not config.get("model_type"):
        return None, "config.json has no model_type"
    if table_verified(config) and not force:
        return None, TABLE_VERIFIED
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, "transformers is not installed"
    config_file = folder / "config.json" if folder is not None and folder.is_dir() else None
    if config_file is not None and not config_file.is_file():
        config_file = None
    key = (str(config_file), _freeze(config))
    if key not in _TREES:
        if len(_TREES) >= 8:
            _TREES.pop(next(iter(_TREES)))
        _TREES[key] = _build_tree(config, config_file)
    return _TREES[key]


_TREES: dict[tuple, tuple[ModelTree | None, str | None]] = {}


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _build_tree(config: dict, config_file: Path | None) -> tuple[ModelTree | None, str | None]:
    try:
        model = _meta_model(config, config_file)
    except Exception as exc:  # noqa: BLE001 - any failure means "use the naming tables"
        return None, f"transformers cannot build {config.get('model_type')}: {type(exc).__name__}"
    return tree_of_model(model, live_renamer(model)), None


def _meta_model(config_dict: dict, config_file: Path | None):
    """The model on the meta device; config.json is parsed by transformers itself (it reads what it wrote)."""
    import torch
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # building a head class alone logs advice meant for training
    try:
        return _build_on_meta(transformers, torch, config_dict, config_file)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_on_meta(transformers, torch, config_dict: dict, config_file: Path | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config_file is not None:
            config = transformers.AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
        else:
            fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
            config = transformers.AutoConfig.for_model(config_dict["model_type"], **fields)
        clamp_for_build(config)
        architectures = config_dict.get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "_from_config"):
                return cls._from_config(config)
            for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText", "AutoModel"):
                try:
                    return getattr(transformers, auto).from_config(config)
                except ValueError:
                    continue
    raise ValueError("no auto class builds this config")


def live_renamer(model) -> Callable[[str], tuple[str, str | None]]:
    """checkpoint key → (live parameter name, fused parameter), by transformers' own conversion mapping.

    The live name is the key after the plain renamings; the fused parameter is the live parameter a converter
    merges the key into on load (``model.layers.0.mlp.experts.gate_up_proj`` for expert 3's ``up_proj``), else
    None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: keys load under their stored names
        return lambda key: (key, None)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    live = dict.fromkeys([name for name, _ in model.named_parameters()], True)
    live.update(dict.fromkeys([name for name, _ in model.named_buffers()], True))
    prefix = getattr(model, "base_model_prefix", None) or None

    @cache
    def rename(key: str) -> tuple[str, str | None]:
        try:
            renamed, converter = rename_source_key(key, renamings, converters, prefix, live)
            if converter is None:
                return renamed, None
            return rename_source_key(key, renamings, [], prefix, live)[0], renamed
        except Exception:  # noqa: BLE001 - a key transformers cannot place keeps its stored name
            return key, None

    return rename


def live_names(config: dict, folder: Path | None, names: list[str]) -> dict[str, str]:
    """checkpoint tensor name → live parameter name (identity where transformers renames nothing or is absent)."""
    tree, _ = tree_for_checkpoint(config, folder)
    if tree is None:
        return {name: name for name in names}
    return {name: tree.live_name(name) for name in names}
