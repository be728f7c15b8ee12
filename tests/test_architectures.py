"""Every architecture family transformers ships, built by transformers itself and checked end to end.

For each model type: a tiny random model from ``from_config``, written by ``save_pretrained``
(single file, and sharded for a few), scanned; every ``nn.Linear`` / ``Conv1D`` inside the blocks
must appear in the scan with the layer index and module path the module tree gives (the block's
position in its ``nn.ModuleList``, stacks numbered in depth order), never as ``other``.  The
scan is then planned (alphalora, hilo, adaptive-lora), the one-expert plan is exported to PEFT and
built by real PEFT, and the MoE plan is applied with our runtime and run forward.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from layerscope import plan, scan  # noqa: E402
from layerscope.checkpoint.architectures import ARCHITECTURES, ROLE_GROUPS  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.export.formats import to_peft_config  # noqa: E402
from layerscope.runtime import apply_plan  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, pad_token_id=0, max_position_embeddings=128)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2)
MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
           n_group=1, topk_group=1)
CAUSAL, BASE = "causal", "base"

# model type → (auto class, config overrides).  At least 30 types across every naming family.
ZOO: dict[str, tuple[str, dict]] = {
    "llama": (CAUSAL, {}), "mistral": (CAUSAL, {}), "qwen2": (CAUSAL, {}), "qwen3": (CAUSAL, {}),
    "gemma": (CAUSAL, {"head_dim": 16}), "gemma2": (CAUSAL, {"head_dim": 16}),
    "gemma3_text": (CAUSAL, {"head_dim": 16}), "granite": (CAUSAL, {}), "olmo": (CAUSAL, {}),
    "olmo2": (CAUSAL, {}), "cohere": (CAUSAL, {}), "stablelm": (CAUSAL, {}), "helium": (CAUSAL, {"head_dim": 16}),
    "smollm3": (CAUSAL, {}), "exaone4": (CAUSAL, {}), "ernie4_5": (CAUSAL, {}), "glm": (CAUSAL, {}),
    "glm4": (CAUSAL, {}), "nemotron": (CAUSAL, {}),
    "mixtral": (CAUSAL, MOE), "qwen2_moe": (CAUSAL, {**MOE, "shared_expert_intermediate_size": 64}),
    "qwen3_moe": (CAUSAL, MOE), "olmoe": (CAUSAL, MOE), "phimoe": (CAUSAL, MOE),
    "deepseek_v2": (CAUSAL, {**MOE, **MLA, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                             "n_shared_experts": 1}),
    "deepseek_v3": (CAUSAL, {**MOE, **MLA, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                             "n_shared_experts": 1}),
    "llama4_text": (CAUSAL, {**MOE, "intermediate_size_mlp": 128, "head_dim": 16}),
    "gpt_oss": (CAUSAL, {**MOE, "head_dim": 16}),
    "granitemoe": (CAUSAL, MOE),
    "phi": (CAUSAL, {}), "phi3": (CAUSAL, {}), "starcoder2": (CAUSAL, {}),
    "opt": (CAUSAL, {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "gpt2": (CAUSAL, {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "gpt_bigcode": (CAUSAL, {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "gptj": (CAUSAL, {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}),
    "codegen": (CAUSAL, {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}),
    "gpt_neox": (CAUSAL, {}), "persimmon": (CAUSAL, {}), "falcon": (CAUSAL, {}), "bloom": (CAUSAL, {"n_head": 4}),
    "mpt": (CAUSAL, {"d_model": 64, "n_heads": 4, "n_layers": 2}),
    "t5": (BASE, {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4, "d_kv": 16}),
    "mt5": (BASE, {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}),
    "bart": (BASE, {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 128,
                    "decoder_ffn_dim": 128, "encoder_attention_heads": 4, "decoder_attention_heads": 4}),
    "olmo3": (CAUSAL, {}), "cohere2": (CAUSAL, {}), "seed_oss": (CAUSAL, {}), "arcee": (CAUSAL, {}),
    "apertus": (CAUSAL, {}), "bitnet": (CAUSAL, {}), "flex_olmo": (CAUSAL, MOE),
    "dots1": (CAUSAL, {**MOE, "first_k_dense_replace": 1, "n_shared_experts": 1}),
    "granitemoeshared": (CAUSAL, {**MOE, "shared_intermediate_size": 64}),
    "biogpt": (CAUSAL, {}), "xglm": (CAUSAL, {"d_model": 64, "num_layers": 2, "ffn_dim": 128}),
    "umt5": (BASE, {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}),
    "longt5": (BASE, {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}),
    **{bart_like: ("base", {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 128,
                            "decoder_ffn_dim": 128, "encoder_attention_heads": 4, "decoder_attention_heads": 4})
       for bart_like in ("mbart", "pegasus", "marian", "plbart", "blenderbot", "blenderbot-small", "m2m_100")},
    "xlm-roberta": (BASE, {}), "camembert": (BASE, {}), "ernie": (BASE, {}), "data2vec-text": (BASE, {}),
    "roc_bert": (BASE, {}), "megatron-bert": (BASE, {}), "electra": (BASE, {}),
    "bert": (BASE, {}), "roberta": (BASE, {}), "distilbert": (BASE, {"dim": 64, "hidden_dim": 128, "n_layers": 2,
                                                                       "n_heads": 4}),
}
SHARDED = {"llama", "qwen3_moe", "t5", "gpt2"}


def _build(model_type: str):
    kind, overrides = ZOO[model_type]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    auto = transformers.AutoModelForCausalLM if kind == CAUSAL else transformers.AutoModel
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(config)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists holding Linear layers: the model's block stacks, in registration order."""
    lists = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer, _ in lists):
            if any(isinstance(m, (nn.Linear, Conv1D)) for m in module.modules()):
                lists.append((name, module))
    return lists


def _expected_linears(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """module path → (depth-order layer, in_features, out_features) for every Linear/Conv1D inside a block."""
    expected, offset = {}, 0
    for list_name, blocks in _block_lists(model):
        for index, block in enumerate(blocks):
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    expected[f"{list_name}.{index}.{sub}"] = (offset + index, module.in_features, module.out_features)
                elif isinstance(module, Conv1D):
                    in_f, out_f = module.weight.shape
                    expected[f"{list_name}.{index}.{sub}"] = (offset + index, in_f, out_f)
        offset += len(blocks)
    return expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model type → (folder, model); built lazily, once per module."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            try:
                model = _build(model_type)
            except Exception as exc:  # transformers cannot build this type here: name it and skip
                pytest.skip(f"transformers {transformers.__version__} cannot build {model_type}: "
                            f"{type(exc).__name__}: {str(exc)[:120]}")
            folder = tmp_path_factory.mktemp(model_type)
            shard = "2KB" if model_type in SHARDED else "1GB"
            model.save_pretrained(folder, max_shard_size=shard)
            cache[model_type] = (folder, model)
        return cache[model_type]

    return get


def test_zoo_has_at_least_30_architectures_and_covers_every_claimed_model_type():
    assert len(ZOO) >= 30
    claimed = {t for arch in ARCHITECTURES for t in arch["model_types"]}
    # Claimed from their published checkpoints' names only; transformers here builds no model for them.
    not_buildable = {"RefinedWeb", "RefinedWebModel"}
    assert claimed - not_buildable <= set(ZOO), sorted(claimed - not_buildable - set(ZOO))


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_scan_maps_every_linear_like_the_module_tree(saved, model_type):
    folder, model = saved(model_type)
    if model_type in SHARDED:
        assert (folder / "model.safetensors.index.json").is_file()
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    assert table.attrs["naming"] != "generic", "architecture fell back to the generic rule"
    expected = _expected_linears(model)
    assert expected, "no Linear inside blocks: the zoo entry is wrong"
    rows = table[table["part"].isna()].set_index("module", drop=False)
    saved_names = set(table["tensor"])
    for path, (layer, in_f, out_f) in expected.items():
        if f"{path}.weight" not in saved_names:
            continue  # tied to another module's weight, not stored twice
        assert path in rows.index, f"{path} is missing from the scan"
        row = rows.loc[path]
        assert row["kind"] in ("projection", "router"), f"{path} got kind {row['kind']}"
        assert int(row["layer"]) == layer, f"{path}: layer {row['layer']} != {layer}"
        assert (int(row["in_features"]), int(row["out_features"])) == (in_f, out_f), path
    inside = table[table["layer"].notna()]
    assert not (inside["kind"] == "other").any(), f"unmapped: {sorted(inside[inside['kind'] == 'other']['tensor'])}"
    assert table.attrs["num_layers"] == sum(len(b) for _, b in _block_lists(model))
    assert not table.attrs["missing"], "a complete checkpoint reported missing matrices"


PEFT_RENAMES_MLP = {"deepseek_v2", "deepseek_v3", "dots1"}
MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "llama4_text",
             "gpt_oss", "granitemoe"}


@pytest.mark.parametrize("model_type", sorted(MOE_TYPES))
def test_moe_experts_are_experts(saved, model_type):
    folder, model = saved(model_type)
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    experts = table[table["kind"] == "expert"]
    assert len(experts), "no expert matrices found"
    assert set(experts["expert"].astype(int)) == set(range(4))
    assert (table[table["kind"] == "router"]["layer"].notna()).all()
    if model_type in ("deepseek_v2", "deepseek_v3"):  # first block dense, the rest MoE
        assert set(experts["layer"].astype(int)) == {1, 2}
        dense = table[(table["layer"] == 0) & (table["kind"] == "projection")]
        assert {"gate", "up", "down", "q_a", "q_b", "kv_a", "kv_b", "o"} <= set(dense["role"])
        assert {"shared_gate", "shared_up", "shared_down"} <= set(table[table["layer"] == 1]["role"])


def test_t5_stacks_are_separate_sequences(saved):
    folder, _ = saved("t5")
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    blocks = table[table["layer"].notna()].drop_duplicates("layer").sort_values("layer")
    assert list(zip(blocks["stack"], blocks["stack_layer"].astype(int))) == [
        ("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1), ("decoder", 2)]
    decoder = table[(table["stack"] == "decoder") & (table["stack_layer"] == 0)]
    assert {"q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "up", "down"} <= set(decoder["role"])


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_plans_export_and_apply(saved, model_type):
    folder, _ = saved(model_type)
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    layers = table.attrs["num_layers"]
    moe_plan = plan(table, "alphalora", metric="alpha_hill", total_experts=2 * layers, progress=False)
    plan(table, "hilo", ranks=(4, 8), progress=False)
    single = plan(table, "adaptive-lora", progress=False)
    assert sum(layer["experts"] for layer in moe_plan.layers) == 2 * layers

    if model_type in PEFT_RENAMES_MLP:  # PEFT's own v5 MoE conversion would retarget dense gate_proj/up_proj
        with pytest.raises(LayerscopeError, match="PEFT converts targets"):
            to_peft_config(single)
        attention = sorted(set(single.document["target_roles"]) & ROLE_GROUPS["attention"])
        single = plan(table, "adaptive-lora", target_roles=attention, progress=False)
    config = to_peft_config(single)
    peft_model = peft.get_peft_model(_build(model_type), peft.LoraConfig(**{
        k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path", "inference_mode")}))
    built = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
             if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict)}
    assert built == {m["name"] for m in single.modules()}
    for name, module in peft_model.named_modules():
        short = name.removeprefix("base_model.model.")
        if short in built:
            planned = next(m for m in single.modules() if m["name"] == short)
            assert module.r["default"] == planned["rank"], short

    live = apply_plan(_build(model_type), moe_plan, verbose=False)
    inputs = torch.randint(1, 200, (1, 8))
    encoder_decoder = getattr(live.config, "is_encoder_decoder", False)
    kwargs = {"decoder_input_ids": inputs} if encoder_decoder else {}
    with torch.no_grad():
        live(input_ids=inputs, **kwargs)
    json.dumps(moe_plan.document)  # serialisable as is
