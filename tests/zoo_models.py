"""Tiny models of every type in transformers' own registries, built by transformers itself.

The model types come from the pinned transformers' auto mappings (causal LM, seq2seq LM, masked LM,
image-text-to-text), so a type added to transformers is covered when the pin moves.  A tiny config is
the type's default config with every size field shrunk (recursively through ``text_config``,
``vision_config``, ``audio_config`` ...).  A type whose tiny model cannot be built raises
:class:`NotTiny` with the reason, which the zoo lists rather than hides.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

TASKS = {  # registry name → (auto class, short task name)
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": ("AutoModelForCausalLM", "causal-lm"),
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": ("AutoModelForSeq2SeqLM", "seq2seq-lm"),
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": ("AutoModelForMaskedLM", "masked-lm"),
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": ("AutoModelForImageTextToText", "image-text-to-text"),
}
MAX_PARAMETERS = 20_000_000  # a "tiny" model; bigger defaults are shrunk further or listed

# Size fields, by what they mean; set where the config has them.
WIDTH = 64
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "n_embed", "model_dim",
                     "word_embed_proj_dim", "projection_dim", "text_embed_dim", "vision_embed_dim",
                     "hidden_dim_vision", "mm_hidden_size"), WIDTH),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
                     "hidden_dim", "ffn_hidden_size", "intermediate_size_mlp", "mlp_dim", "inner_hidden_size",
                     "shared_intermediate_size", "shared_expert_intermediate_size", "dense_intermediate_size"),
                    2 * WIDTH),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size"), WIDTH // 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim", "v_head_dim", "qk_head_dim"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"),
                    4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k"), 2),
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "n_group": 1, "topk_group": 1, "rotary_dim": 8,
    # linear attention / state space
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "ssm_state_size": 16,
    "state_size": 16, "n_groups": 1, "mamba_expand": 2, "mamba_headdim": 32, "mamba_head_dim": 32,
    "time_step_rank": 8, "mamba_dt_rank": 8, "mamba_d_ssm": 2 * WIDTH,
    # vision / audio towers
    "image_size": 32, "patch_size": 8, "num_channels": 3,
    "vocab_size": 512, "max_position_embeddings": 256,
}
# Per-type settings where the default config would build only one kind of layer (LFM2's default is all
# attention): the tiny model must hold every kind of block the family has.
OVERRIDES: dict[str, dict] = {
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
}
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
                "num_decoder_layers", "n_layers", "depth", "num_encoder_layers")


class NotTiny(Exception):
    """This model type cannot be built tiny here; the message says why."""


@dataclass(frozen=True)
class ZooEntry:
    model_type: str
    task: str
    auto_class: str


def registry() -> list[ZooEntry]:
    """Every (model type, task) of the four registries; a type in several gets its first task."""
    from transformers.models.auto import modeling_auto

    entries: dict[str, ZooEntry] = {}
    for mapping, (auto_class, task) in TASKS.items():
        for model_type in getattr(modeling_auto, mapping):
            entries.setdefault(model_type, ZooEntry(model_type, task, auto_class))
    return sorted(entries.values(), key=lambda e: e.model_type)


def _remap_token_ids(config) -> None:
    """Special-token ids beyond the tiny vocabulary move to distinct ids just below its end."""
    if not _is_int(_get(config, "vocab_size")):
        return
    vocab = SIZES["vocab_size"]
    free = iter(range(vocab - 1, vocab // 2, -1))
    moved: dict[int, int] = {}
    for key, value in list(vars(config).items()):
        if "token" not in key or not ("id" in key or "index" in key):
            continue
        if _is_int(value) and value >= vocab:
            _set(config, key, moved.setdefault(value, next(free)))
        elif isinstance(value, list) and all(_is_int(v) for v in value):
            _set(config, key, [moved.setdefault(v, next(free)) if v >= vocab else v for v in value])
    _set(config, "vocab_size", vocab)


def _get(config, key: str):
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read
        return None


def _set(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # noqa: BLE001 - derived properties have no setter
        pass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrink(config, layers: int | None) -> None:
    """Shrink one config in place; sub-configs are shrunk by the caller."""
    for key, value in SIZES.items():
        current = _get(config, key)
        if _is_int(current) and current > value:
            _set(config, key, value)
    _remap_token_ids(config)
    if layers is not None:
        for key in LAYER_FIELDS:
            current = _get(config, key)
            if _is_int(current) and current > layers:
                _set(config, key, layers)


def _sub_configs(config):
    from transformers import PretrainedConfig

    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield value
            yield from _sub_configs(value)


def tiny_config(entry: ZooEntry, layers: int | None = 2):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = transformers.AutoConfig.for_model(entry.model_type)
        except Exception as exc:  # noqa: BLE001 - the reason is what the zoo reports
            raise NotTiny(f"no default config: {type(exc).__name__}: {str(exc)[:100]}") from None
        subs = [config, *_sub_configs(config)]
        depths = [_depth(sub) for sub in subs]
        for sub in subs:
            _shrink(sub, layers)
        for sub, depth in zip(subs, depths):
            _resample_per_layer_lists(sub, depth)
        _fix_known_fields(config)
        for key, value in OVERRIDES.get(entry.model_type, {}).items():
            if layers == 2:
                _set(config, key, value)
        if hasattr(config, "validate"):
            config.validate()  # what save_pretrained will check
    return config


def _depth(config) -> int | None:
    return next((_get(config, k) for k in ("num_hidden_layers", "num_layers") if _is_int(_get(config, k))), None)


def _resample_per_layer_lists(config, old_depth: int | None) -> None:
    """Lists with one entry per layer follow the new depth, one entry of each distinct kind first."""
    depth = _depth(config)
    if not old_depth or not depth or depth == old_depth:
        return
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_depth and all(isinstance(v, (str, int, bool)) for v in value):
            kinds = list(dict.fromkeys(value))
            _set(config, key, (kinds * depth)[:depth])


def _fix_known_fields(config) -> None:
    """Fields that must agree with the shrunk sizes (hybrid layer patterns, per-layer lists)."""
    for sub in [config, *_sub_configs(config)]:
        layers = next((_get(sub, k) for k in ("num_hidden_layers", "num_layers") if _is_int(_get(sub, k))), None)
        pattern = _get(sub, "hybrid_override_pattern")
        if isinstance(pattern, str) and layers:
            kinds = "".join(dict.fromkeys(pattern.replace("-", "")))
            _set(sub, "hybrid_override_pattern", (kinds * layers)[:layers] if len(pattern) != layers else pattern)
        layer_types = _get(sub, "layer_types")
        if isinstance(layer_types, list) and layers and len(layer_types) != layers:
            kinds = list(dict.fromkeys(layer_types))  # one layer of each kind first, so every mixer is built
            _set(sub, "layer_types", (kinds * layers)[:layers])
        if "head_dim" in vars(sub) and sub.head_dim is None and _is_int(_get(sub, "num_attention_heads")):
            _set(sub, "head_dim", SIZES["head_dim"])  # derived later from sizes we changed: give it outright
        if _is_int(_get(sub, "first_k_dense_replace")) and layers:
            _set(sub, "first_k_dense_replace", min(sub.first_k_dense_replace, 1))


def parameter_count(entry: ZooEntry, config) -> int:
    import transformers

    auto = getattr(transformers, entry.auto_class)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build(entry: ZooEntry, seed: int = 0):
    """(config, model): the tiny model, random weights, eval mode."""
    import transformers

    auto = getattr(transformers, entry.auto_class)
    reasons = []
    for layers in (2, 3, 4, None):
        try:
            config = tiny_config(entry, layers)
            count = parameter_count(entry, config)
        except NotTiny:
            raise
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}")
            continue
        if count > MAX_PARAMETERS:
            reasons.append(f"{count / 1e6:.0f}M parameters when shrunk")
            continue
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_config(config)
        return config, model.eval()
    raise NotTiny(reasons[0] if reasons else "no tiny config")
