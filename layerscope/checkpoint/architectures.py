"""Architecture naming facts, as data.

Each entry says which ``config.json`` model types it covers, where the decoder/encoder
blocks live (``layer_prefixes``, the part before ``.{layer}.``), and which module path
inside a block plays which role.  ``{expert}`` in a module path matches an expert index.
Modules marked in ``stacked_experts`` are 3-D tensors whose dim 0 is the expert.
``conv1d`` marks GPT-2 style ``Conv1D`` weights stored as (in, out).
``fused`` says how a fused role splits into parts along the output dimension:
``"equal"`` for equal parts, ``"heads"`` for q | k | v sized by the attention config.
"""

from __future__ import annotations

_LLAMA_ATTENTION = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
}

ARCHITECTURES: list[dict] = [
    {
        "name": "llama",
        "model_types": ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"],
        "layer_prefixes": ["model.layers", "layers"],
        "modules": {
            **_LLAMA_ATTENTION,
            "mlp.gate_proj": "gate",
            "mlp.up_proj": "up",
            "mlp.down_proj": "down",
        },
    },
    {
        "name": "mixtral",
        "model_types": ["mixtral"],
        "layer_prefixes": ["model.layers", "layers"],
        "modules": {
            **_LLAMA_ATTENTION,
            "block_sparse_moe.gate": "router",
            "block_sparse_moe.experts.{expert}.w1": "w1",
            "block_sparse_moe.experts.{expert}.w2": "w2",
            "block_sparse_moe.experts.{expert}.w3": "w3",
            "mlp.gate": "router",
            "mlp.experts.gate_up_proj": "gate_up",
            "mlp.experts.down_proj": "down",
        },
        "stacked_experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
    {
        "name": "phi3",
        "model_types": ["phi3"],
        "layer_prefixes": ["model.layers", "layers"],
        "modules": {
            "self_attn.qkv_proj": "qkv",
            "self_attn.o_proj": "o",
            "mlp.gate_up_proj": "gate_up",
            "mlp.down_proj": "down",
        },
        "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "heads"},
                  "gate_up": {"parts": ["gate", "up"], "split": "equal"}},
    },
    {
        "name": "gpt2",
        "model_types": ["gpt2"],
        "layer_prefixes": ["transformer.h", "h"],
        "modules": {
            "attn.c_attn": "qkv",
            "attn.c_proj": "o",
            "mlp.c_fc": "up",
            "mlp.c_proj": "down",
        },
        "conv1d": True,
        "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "equal"}},
    },
    {
        "name": "bert",
        "model_types": ["bert", "roberta", "xlm-roberta", "electra"],
        "layer_prefixes": ["encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"],
        "modules": {
            "attention.self.query": "q",
            "attention.self.key": "k",
            "attention.self.value": "v",
            "attention.output.dense": "o",
            "intermediate.dense": "up",
            "output.dense": "down",
        },
    },
    {
        "name": "gpt_neox",
        "model_types": ["gpt_neox"],
        "layer_prefixes": ["gpt_neox.layers", "layers"],
        "modules": {
            # Fused per head (interleaved q,k,v blocks), so it is reported fused only.
            "attention.query_key_value": "qkv",
            "attention.dense": "o",
            "mlp.dense_h_to_4h": "up",
            "mlp.dense_4h_to_h": "down",
        },
    },
    {
        "name": "falcon",
        "model_types": ["falcon", "RefinedWeb", "RefinedWebModel"],
        "layer_prefixes": ["transformer.h", "h"],
        "modules": {
            # Layout of the fused projection depends on multi-query settings: reported fused only.
            "self_attention.query_key_value": "qkv",
            "self_attention.dense": "o",
            "mlp.dense_h_to_4h": "up",
            "mlp.dense_4h_to_h": "down",
        },
    },
]

# Tensors outside the blocks (or inside but not projections), classified by name.
# First match wins; a 2-D tensor inside a block that no role matches is "other".
NON_LAYER_KINDS: list[tuple[str, str]] = [
    ("lm_head", r"(^|\.)(lm_head|embed_out)\."),
    ("embedding", r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings"
                  r"|token_type_embeddings|embed_positions)\."),
    ("norm", r"(norm|(^|\.)ln_\w*|layernorm)"),
]

# Roles that are routers rather than adapter targets.
ROUTER_ROLES = frozenset({"router"})

# Prefixes adapter files put in front of the base model's names, and their factor suffixes.
ADAPTER_PREFIXES = ("base_model.model.",)
ADAPTER_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

# Which roles are attention and which feed-forward (Adaptive-LoRA's attention-heavy mode).
ROLE_GROUPS: dict[str, frozenset[str]] = {
    "attention": frozenset({"q", "k", "v", "o", "qkv"}),
    "mlp": frozenset({"gate", "up", "down", "gate_up"}),
}
