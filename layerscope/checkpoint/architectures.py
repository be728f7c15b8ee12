"""Architecture naming facts, as data.

Each entry says which ``config.json`` model types it covers, where its blocks live and which
module path inside a block plays which role.

``stacks``          the block sequences, in depth order: ``{"stack": name, "prefixes": [...],
                    "count": [config keys]}``.  A prefix is the part before ``.{layer}.``; any
                    wrapper in front of it (``base_model.model.``, ``language_model.``) is
                    accepted.  ``count`` names the config.json fields holding the stack's depth.
                    Encoder-decoder models have two stacks; their blocks are numbered
                    consecutively in depth order (``layer``), and ``stack`` / ``stack_layer``
                    say which stack and which block of it.
``modules``         module path inside a block → role.  ``{expert}`` matches an expert index.
``stacked_experts`` modules stored as one 3-D tensor whose dim 0 is the expert.
``transposed``      modules stored (in, out) rather than torch's (out, in); ``"*"`` for all
                    (GPT-2's ``Conv1D``).
``fused``           how a fused role splits into parts along the output dimension: ``"equal"``
                    parts, or ``"heads"`` (q | k | v sized by the attention config).

Roles: q k v o | qkv (fused) | kv (fused k|v) | q_a q_b kv_a kv_b (MLA low-rank projections) |
cross_q cross_k cross_v cross_o (encoder-decoder attention) | gate up down | gate_up (fused) |
shared_gate shared_up shared_down (always-on shared expert) | router | shared_router.
A role inside ``{expert}`` keeps its projection name (``gate``, ``up``, ``down``) with kind ``expert``; the expert's
index is the ``expert`` column.
"""

from __future__ import annotations

LLAMA_ATTENTION = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                   "self_attn.o_proj": "o"}
GATED_MLP = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
MLA_ATTENTION = {"self_attn.q_proj": "q", "self_attn.q_a_proj": "q_a", "self_attn.q_b_proj": "q_b",
                 "self_attn.kv_a_proj_with_mqa": "kv_a", "self_attn.kv_b_proj": "kv_b", "self_attn.o_proj": "o"}
EXPERT_MLP = {"mlp.experts.{expert}.gate_proj": "gate", "mlp.experts.{expert}.up_proj": "up",
              "mlp.experts.{expert}.down_proj": "down", "mlp.gate": "router"}
# transformers >= 5 keeps experts fused in memory; these are the names when saved that way.
FUSED_EXPERTS = {"mlp.experts.gate_up_proj": "gate_up", "mlp.experts.down_proj": "down"}
BART_LAYER = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
              "encoder_attn.q_proj": "cross_q", "encoder_attn.k_proj": "cross_k", "encoder_attn.v_proj": "cross_v",
              "encoder_attn.out_proj": "cross_o", "fc1": "up", "fc2": "down"}


def _decoder(*prefixes: str, count: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")) -> list[dict]:
    return [{"stack": "decoder", "prefixes": list(prefixes), "count": list(count)}]


def _encoder(*prefixes: str, count: tuple[str, ...] = ("num_hidden_layers", "n_layers", "num_layers")) -> list[dict]:
    return [{"stack": "encoder", "prefixes": list(prefixes), "count": list(count)}]


LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "olmo2",
              "olmo3", "cohere", "cohere2", "stablelm", "helium", "smollm3", "exaone4", "ernie4_5", "glm", "glm4",
              "seed_oss", "arcee", "apertus", "bitnet", "nemotron"]

ARCHITECTURES: list[dict] = [
    {"name": "llama", "model_types": LLAMA_LIKE, "stacks": _decoder("model.layers", "layers"),
     # nemotron has no gate_proj; arcee/apertus neither (up/down only): the missing role is simply absent.
     "modules": {**LLAMA_ATTENTION, **GATED_MLP,
                 # GLM-4 keeps gate and up fused in one Linear.
                 "mlp.gate_up_proj": "gate_up"},
     "fused": {"gate_up": {"parts": ["gate", "up"], "split": "equal"}}},
    {"name": "mixtral", "model_types": ["mixtral"], "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION,
                 "block_sparse_moe.gate": "router",
                 "block_sparse_moe.experts.{expert}.w1": "gate",
                 "block_sparse_moe.experts.{expert}.w2": "down",
                 "block_sparse_moe.experts.{expert}.w3": "up",
                 "mlp.gate": "router", **FUSED_EXPERTS},
     "stacked_experts": list(FUSED_EXPERTS)},
    {"name": "qwen_moe", "model_types": ["qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "flex_olmo", "dots1"],
     "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION, **GATED_MLP, **EXPERT_MLP, **FUSED_EXPERTS,
                 "mlp.shared_expert.gate_proj": "shared_gate", "mlp.shared_expert.up_proj": "shared_up",
                 "mlp.shared_expert.down_proj": "shared_down",
                 "mlp.shared_experts.gate_proj": "shared_gate", "mlp.shared_experts.up_proj": "shared_up",
                 "mlp.shared_experts.down_proj": "shared_down",
                 "mlp.shared_expert_gate": "shared_router",
                 # PhiMoE keeps Mixtral's expert names.
                 "block_sparse_moe.gate": "router",
                 "block_sparse_moe.experts.{expert}.w1": "gate", "block_sparse_moe.experts.{expert}.w2": "down",
                 "block_sparse_moe.experts.{expert}.w3": "up"},
     "stacked_experts": list(FUSED_EXPERTS)},
    {"name": "deepseek", "model_types": ["deepseek_v2", "deepseek_v3"],
     # The first `first_k_dense_replace` blocks are dense (mlp.gate_proj ...), the rest MoE.
     "stacks": _decoder("model.layers", "layers"),
     "modules": {**MLA_ATTENTION, **GATED_MLP, **EXPERT_MLP, **FUSED_EXPERTS,
                 "mlp.shared_experts.gate_proj": "shared_gate", "mlp.shared_experts.up_proj": "shared_up",
                 "mlp.shared_experts.down_proj": "shared_down"},
     "stacked_experts": list(FUSED_EXPERTS)},
    {"name": "llama4", "model_types": ["llama4_text"],
     "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION,
                 "feed_forward.gate_proj": "gate", "feed_forward.up_proj": "up", "feed_forward.down_proj": "down",
                 "feed_forward.router": "router",
                 "feed_forward.experts.gate_up_proj": "gate_up", "feed_forward.experts.down_proj": "down",
                 "feed_forward.shared_expert.gate_proj": "shared_gate",
                 "feed_forward.shared_expert.up_proj": "shared_up",
                 "feed_forward.shared_expert.down_proj": "shared_down"},
     "stacked_experts": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
     "transposed": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]},
    {"name": "gpt_oss", "model_types": ["gpt_oss"], "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION, "mlp.router": "router", **FUSED_EXPERTS},
     "stacked_experts": list(FUSED_EXPERTS),
     # bf16 checkpoints store experts (in, out); the MXFP4 blocks are (out, in) and are read that way.
     "transposed": list(FUSED_EXPERTS)},
    {"name": "granitemoe", "model_types": ["granitemoe", "granitemoeshared"],
     "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION, "block_sparse_moe.router.layer": "router",
                 "block_sparse_moe.input_linear": "gate_up", "block_sparse_moe.output_linear": "down",
                 "shared_mlp.input_linear": "shared_gate_up", "shared_mlp.output_linear": "shared_down"},
     "stacked_experts": ["block_sparse_moe.input_linear", "block_sparse_moe.output_linear"]},
    {"name": "phi", "model_types": ["phi"], "stacks": _decoder("model.layers", "layers"),
     "modules": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                 "self_attn.dense": "o", "mlp.fc1": "up", "mlp.fc2": "down"}},
    {"name": "phi3", "model_types": ["phi3"], "stacks": _decoder("model.layers", "layers"),
     "modules": {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up",
                 "mlp.down_proj": "down"},
     "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "heads"},
               "gate_up": {"parts": ["gate", "up"], "split": "equal"}}},
    {"name": "starcoder2", "model_types": ["starcoder2"], "stacks": _decoder("model.layers", "layers"),
     "modules": {**LLAMA_ATTENTION, "mlp.c_fc": "up", "mlp.c_proj": "down"}},
    {"name": "opt", "model_types": ["opt", "biogpt", "xglm"], "stacks": _decoder("model.decoder.layers", "decoder.layers",
                                                                              "model.layers", "biogpt.layers"),
     "modules": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                 "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"}},
    {"name": "gpt2", "model_types": ["gpt2"], "stacks": _decoder("transformer.h", "h"),
     "modules": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"},
     "transposed": "*",
     "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "equal"}}},
    {"name": "gpt_bigcode", "model_types": ["gpt_bigcode"], "stacks": _decoder("transformer.h", "h"),
     # nn.Linear (out, in), unlike GPT-2; multi-query: q is hidden wide, k and v one head each.
     "modules": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"},
     "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "heads"}}},
    {"name": "gptj", "model_types": ["gptj"], "stacks": _decoder("transformer.h", "h"),
     "modules": {"attn.q_proj": "q", "attn.k_proj": "k", "attn.v_proj": "v", "attn.out_proj": "o",
                 "mlp.fc_in": "up", "mlp.fc_out": "down"}},
    {"name": "codegen", "model_types": ["codegen"], "stacks": _decoder("transformer.h", "h"),
     # CodeGen interleaves q, v, k in model-parallel slices: reported fused only.
     "modules": {"attn.qkv_proj": "qkv", "attn.out_proj": "o", "mlp.fc_in": "up", "mlp.fc_out": "down"}},
    {"name": "gpt_neox", "model_types": ["gpt_neox", "persimmon"],
     "stacks": _decoder("gpt_neox.layers", "model.layers", "layers"),
     # Fused per head (interleaved q,k,v blocks), so it is reported fused only.
     "modules": {"attention.query_key_value": "qkv", "attention.dense": "o",
                 "self_attn.query_key_value": "qkv", "self_attn.dense": "o",
                 "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"}},
    {"name": "falcon", "model_types": ["falcon", "RefinedWeb", "RefinedWebModel", "bloom"],
     "stacks": _decoder("transformer.h", "h"),
     # Layout of the fused projection depends on multi-query settings: reported fused only.
     "modules": {"self_attention.query_key_value": "qkv", "self_attention.dense": "o",
                 "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"}},
    {"name": "mpt", "model_types": ["mpt"], "stacks": _decoder("transformer.blocks", "blocks"),
     "modules": {"attn.Wqkv": "qkv", "attn.out_proj": "o", "ffn.up_proj": "up", "ffn.down_proj": "down"},
     "fused": {"qkv": {"parts": ["q", "k", "v"], "split": "heads"}}},
    {"name": "t5", "model_types": ["t5", "mt5", "umt5", "longt5"],
     "stacks": [{"stack": "encoder", "prefixes": ["encoder.block"], "count": ["num_layers"]},
                {"stack": "decoder", "prefixes": ["decoder.block"], "count": ["num_decoder_layers", "num_layers"]}],
     # block.{i}.layer.{j}: j = 0 self-attention, 1 cross-attention (decoder) or feed-forward (encoder), 2 ff.
     "modules": {"layer.0.SelfAttention.q": "q", "layer.0.SelfAttention.k": "k", "layer.0.SelfAttention.v": "v",
                 "layer.0.SelfAttention.o": "o",
                 # LongT5's encoder: local or transient-global attention in place of SelfAttention.
                 **{f"layer.0.{kind}.{p}": p for kind in ("LocalSelfAttention", "TransientGlobalSelfAttention")
                    for p in "qkvo"},
                 "layer.1.EncDecAttention.q": "cross_q", "layer.1.EncDecAttention.k": "cross_k",
                 "layer.1.EncDecAttention.v": "cross_v", "layer.1.EncDecAttention.o": "cross_o",
                 **{f"layer.{j}.DenseReluDense.{name}": role for j in (1, 2)
                    for name, role in (("wi", "up"), ("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))}}},
    {"name": "bart", "model_types": ["bart", "mbart", "pegasus", "marian", "plbart", "blenderbot",
                                      "blenderbot-small", "m2m_100"],
     "stacks": [{"stack": "encoder", "prefixes": ["model.encoder.layers", "encoder.layers"],
                 "count": ["encoder_layers"]},
                {"stack": "decoder", "prefixes": ["model.decoder.layers", "decoder.layers"],
                 "count": ["decoder_layers"]}],
     "modules": BART_LAYER},
    {"name": "bert", "model_types": ["bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "data2vec-text",
                                      "roc_bert", "megatron-bert"],
     "stacks": _encoder("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer"),
     "modules": {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                 "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"}},
    {"name": "distilbert", "model_types": ["distilbert"], "stacks": _encoder("transformer.layer", "distilbert.transformer.layer"),
     "modules": {"attention.q_lin": "q", "attention.k_lin": "k", "attention.v_lin": "v", "attention.out_lin": "o",
                 "ffn.lin1": "up", "ffn.lin2": "down"}},
]

# Tensors outside the blocks (or inside but not projections), classified by name.
# First match wins; a 2-D tensor inside a block that no role matches is "other".
NON_LAYER_KINDS: list[tuple[str, str]] = [
    ("lm_head", r"(^|\.)(lm_head|embed_out)\."),
    ("embedding", r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|shared"
                  r"|token_type_embeddings|embed_positions|relative_attention_bias)\."),
    ("norm", r"(norm|(^|\.)ln_\w*|layernorm)"),
]

# Roles that are routers rather than adapter targets.
ROUTER_ROLES = frozenset({"router", "shared_router"})

# Prefixes adapter files put in front of the base model's names, and their factor suffixes.
ADAPTER_PREFIXES = ("base_model.model.",)
ADAPTER_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

# Which roles are attention and which feed-forward (Adaptive-LoRA's attention-heavy mode).
# Token mixers of every kind (linear attention, state space, conv) count as attention here.
ROLE_GROUPS: dict[str, frozenset[str]] = {
    "attention": frozenset({"q", "k", "v", "o", "qkv", "kv", "q_a", "q_b", "kv_a", "kv_b",
                            "cross_q", "cross_k", "cross_v", "cross_o"}),
    "mlp": frozenset({"gate", "up", "down", "gate_up", "shared_gate", "shared_up", "shared_down",
                      "shared_gate_up"}),
}

# A block list owned by no sub-config (see checkpoint.modeltree) is a tower when its path says so.
# nn.Linear subclasses whose forward is not x ↦ Wx + b (grouped per-head projections): not adapter targets.
NOT_PROJECTION_CLASSES = r"Grouped"

# Sub-configs that hold the language model; any other sub-config's blocks form a tower.
LANGUAGE_SUB_CONFIGS = frozenset({"text", "language", "llm", "decoder", "text_decoder", "thinker"})
TOWER_KEYWORDS: dict[str, str] = {
    "vision": r"(^|\.)(vision\w*|visual\w*|vit|image_\w+|siglip\w*|clip\w*|patch\w*)(\.|$)",
    "audio": r"(^|\.)(audio\w*|speech\w*|sound\w*|whisper\w*)(\.|$)",
    "projector": r"(^|\.)(merger\w*|\w*projector\w*|connector|resampler)(\.|$)",
}

# The module vocabulary shared by most families, for blocks that the model's own entry above does
# not name (and for towers).  A block-relative path splits into a container (``self_attn``,
# ``mlp.experts.3``, ``linear_attn``) and a leaf (``q_proj``); the container says which part of the
# block it is, the leaf which projection.  First match wins in each list.
CONTAINERS: list[tuple[str, str]] = [  # (part, regex searched in the lowercased container)
    ("router", r"(^|\.)(router|gate)(\.|$)|(^|\.)router_\w+$"),
    # Everything under a sparse-attention indexer (its scorer, its own compressor) is the indexer's.
    ("indexer", r"(^|\.)indexer(\.|$)"),
    ("compressor", r"(^|\.)compressor$"),  # DeepSeek V4's KV compressor inside the attention
    ("cross_attention", r"(encoder_attn|cross_attn|crossattention|encdecattention|cross_attention)"),
    ("linear_attention", r"(linear_attn|linear_attention|deltanet|lightning_attn|retention|(^|\.)kda)"),
    ("mamba", r"(^|\.)(mamba\w*|ssm|mixer|ssm_mixer)$"),
    ("conv", r"(^|\.)(conv|short_conv|conv_mixer)$"),
    ("recurrent", r"(^|\.)(temporal_block|rg_lru|recurrent\w*)$"),
    ("adapter", r"(^|\.)(adapter_modules|adapters?|\w+_adapter_list)(\.|$)"),  # Zamba2's per-layer adapter lists
    ("shared", r"(shared_experts?|shared_mlp|shared_ffn)"),
    # JetMoE's mixture of attention heads: per-expert query and output projections, stacked.
    ("attention_experts", r"(attn|attention)\w*\.experts(\.\d+)?$"),
    ("experts", r"(^|\.)experts(\.\d+)?$"),
    ("attention", r"(attn|attention)"),
    ("mlp_in", r"(^|\.)intermediate(_query)?$"),
    ("mlp_out", r"(^|\.)output(_query)?$"),
    ("mlp", r"(mlp|ffn|feed_forward|(^|\.)ff$|intermediate|densereludense|moe|(^|\.)fc$|merger)"),
]
# A Linear inside a norm module (adaptive norms' conditioning) is part of the norm: never planned.
NORM_CONTAINER = r"(^|\.)\w*norm\w*$"
LEAF_ROLES: dict[str, dict[str, str]] = {  # part → {leaf: role}; "*" holds leaves valid in any part
    "*": {**dict.fromkeys(("q_proj", "query", "wq", "q_lin", "query_proj", "to_q"), "q"),
          **dict.fromkeys(("k_proj", "key", "wk", "k_lin", "key_proj", "to_k"), "k"),
          **dict.fromkeys(("v_proj", "value", "wv", "v_lin", "value_proj", "to_v"), "v"),
          **dict.fromkeys(("o_proj", "out_lin", "to_out"), "o"),
          **dict.fromkeys(("qkv_proj", "qkv", "c_attn", "wqkv", "query_key_value", "qkv_linear"), "qkv"),
          **dict.fromkeys(("q_a_proj", "wq_a"), "q_a"), **dict.fromkeys(("q_b_proj", "wq_b"), "q_b"),
          **dict.fromkeys(("kv_a_proj_with_mqa", "wkv_a", "kv_a_proj"), "kv_a"),
          **dict.fromkeys(("kv_b_proj", "wkv_b"), "kv_b"),
          **dict.fromkeys(("gate_proj", "wi_0", "w_gate"), "gate"),
          **dict.fromkeys(("up_proj", "wi_1", "fc_in", "c_fc", "dense_h_to_4h", "lin1", "linear_fc1", "fc1", "wi",
                           "w_in", "w_up"), "up"),
          **dict.fromkeys(("down_proj", "fc_out", "dense_4h_to_h", "lin2", "linear_fc2", "fc2", "w_out", "w_down"),
                          "down"),
          **dict.fromkeys(("gate_up_proj", "gate_up", "w13", "input_linear"), "gate_up"),
          "output_linear": "down", "ffn": "up", "ffn_output": "down",
          "shared_expert_gate": "shared_router",
          "per_layer_input_gate": "per_layer_gate", "per_layer_projection": "per_layer_proj"},
    "attention": {"out_proj": "o", "wo": "o", "dense": "o", "c_proj": "o", "proj": "o", "o": "o", "q": "q",
                  "k": "k", "v": "v", "in_proj": "qkv", "output": "o"},
    "cross_attention": {"out_proj": "o", "wo": "o", "dense": "o", "c_proj": "o", "proj": "o", "o": "o", "q": "q",
                        "k": "k", "v": "v"},
    "mlp": {"w1": "gate", "w3": "up", "w2": "down", "wo": "down", "c_proj": "down", "dense": "down",
            "gate": "router", "router": "router", "linear_1": "up", "linear_2": "down", "intermediate": "up",
            "output": "down", "intermediate_dense": "up", "output_dense": "down", "w_0": "gate", "w_1": "up",
            "key": "up", "value": "down", "receptance": "gate", "0": "up", "2": "down"},
    "mlp_in": {"dense": "up"},
    "mlp_out": {"dense": "down"},
    "experts": {"w1": "gate", "w3": "up", "w2": "down"},
    "attention_experts": {"input_linear": "q", "output_linear": "o"},
    "shared": {"w1": "gate", "w3": "up", "w2": "down", "wo": "down", "c_proj": "down"},
    "router": {"*": "router"},
    # A Linear directly in the block, outside any known part (Zamba's hybrid layer: the shared transformer's
    # output projected back into the Mamba stream; Inkling's vision layers: one projection and a norm).
    "": {"linear": "block_linear", "projection": "block_linear"},
    "indexer": {"weights_proj": "weights", "wkv": "kv", "kv_proj": "kv", "wgate": "gate"},
    "compressor": {"wkv": "kv", "kv_proj": "kv", "wgate": "gate", "gate_proj": "gate"},
    "linear_attention": {"in_proj_qkvz": "lin_qkvz", "in_proj_ba": "lin_ba", "in_proj_qkv": "lin_qkv",
                         "in_proj_z": "lin_z", "in_proj_b": "lin_b", "in_proj_a": "lin_a", "out_proj": "lin_o",
                         "o_proj": "lin_o", "q_proj": "lin_q", "k_proj": "lin_k", "v_proj": "lin_v"},
    "mamba": {"in_proj": "ssm_in", "out_proj": "ssm_out", "x_proj": "ssm_x", "dt_proj": "ssm_dt"},
    "conv": {"in_proj": "conv_in", "out_proj": "conv_out"},
    "recurrent": {"linear_x": "rec_x", "linear_y": "rec_y", "linear_out": "rec_out"},
}
# A leaf no list names, inside a part that is a token mixer, gets this prefix + its leaf name.
PART_ROLE_PREFIX = {"linear_attention": "lin_", "mamba": "ssm_", "conv": "conv_", "attention": "attn_",
                    "indexer": "idx_", "compressor": "attn_compress_", "cross_attention": "cross_attn_", "recurrent": "rec_", "adapter": "adapter_"}
EXPERT_PARTS = frozenset({"experts", "attention_experts"})  # containers whose modules are experts
# Parts whose roles get a prefix: "cross_" (q → cross_q), "shared_" (gate → shared_gate), …
# Indexer and compressor roles are prefixed whatever the leaf, so a module keeps one role whichever way a
# checkpoint or transformers version names it (``wq_b`` or ``q_b_proj`` → idx_q_b; never the MLP's "gate").
ROLE_PREFIX_OF_PART = {"cross_attention": "cross_", "shared": "shared_", "indexer": "idx_",
                       "compressor": "attn_compress_"}

# What kind of token mixer a role belongs to (the ``mixer`` column): attention, linear_attention (Gated
# DeltaNet, KDA, lightning), mamba (selective state space), conv (short convolutions), recurrent (RG-LRU);
# MLP roles have none.
MIXER_ROLE_PREFIXES: list[tuple[str, str]] = [("lin_", "linear_attention"), ("ssm_", "mamba"),
                                              ("conv_", "conv"), ("rec_", "recurrent"), ("idx_", "attention"),
                                              ("attn_", "attention"),
                                              ("cross_", "attention")]
ATTENTION_ROLES = frozenset({"q", "k", "v", "o", "qkv", "kv", "q_a", "q_b", "kv_a", "kv_b"})


def mixer_of_role(role: str | None) -> str | None:
    """attention | linear_attention | mamba | conv for a token-mixer role, None otherwise."""
    if role is None:
        return None
    role = role.rsplit(".", 1)[-1]  # expert.{j}.gate → gate
    if role in ATTENTION_ROLES:
        return "attention"
    return next((mixer for prefix, mixer in MIXER_ROLE_PREFIXES if role.startswith(prefix)), None)
