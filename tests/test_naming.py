"""Every supported naming layout maps every tensor to the right kind, layer and role."""

from __future__ import annotations

import pytest
import torch

from layerscope.checkpoint.naming import detect_scheme
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.spectral.scan import layer_summary, scan
from tests.builders import random_matrix, write_checkpoint

H, F = 16, 32  # hidden and intermediate sizes of the tiny models


def _block(prefix: str, layer: int, modules: dict[str, tuple[tuple[int, ...], str]]):
    return {f"{prefix}.{layer}.{m}.weight": (shape, role) for m, (shape, role) in modules.items()}


LLAMA = {"self_attn.q_proj": ((H, H), "q"), "self_attn.k_proj": ((H, H), "k"), "self_attn.v_proj": ((H, H), "v"),
         "self_attn.o_proj": ((H, H), "o"), "mlp.gate_proj": ((F, H), "gate"), "mlp.up_proj": ((F, H), "up"),
         "mlp.down_proj": ((H, F), "down")}

LAYOUTS = {
    "llama": ({"model_type": "llama"}, "model.layers", LLAMA,
              {"model.embed_tokens.weight": ((64, H), "embedding"), "lm_head.weight": ((64, H), "lm_head"),
               "model.norm.weight": ((H,), "norm")}),
    "qwen2": ({"model_type": "qwen2"}, "model.layers", LLAMA, {"model.layers.0.self_attn.q_proj.bias": ((H,), "bias")}),
    "gpt2": ({"model_type": "gpt2"}, "h",
             {"attn.c_attn": ((H, 3 * H), "qkv"), "attn.c_proj": ((H, H), "o"), "mlp.c_fc": ((H, F), "up"),
              "mlp.c_proj": ((F, H), "down")},
             {"wte.weight": ((64, H), "embedding"), "wpe.weight": ((32, H), "embedding"), "ln_f.weight": ((H,), "norm")}),
    "bert": ({"model_type": "bert"}, "encoder.layer",
             {"attention.self.query": ((H, H), "q"), "attention.self.key": ((H, H), "k"),
              "attention.self.value": ((H, H), "v"), "attention.output.dense": ((H, H), "o"),
              "intermediate.dense": ((F, H), "up"), "output.dense": ((H, F), "down")},
             {"embeddings.word_embeddings.weight": ((64, H), "embedding"),
              "encoder.layer.0.attention.output.LayerNorm.weight": ((H,), "norm"),
              "pooler.dense.weight": ((H, H), "other")}),
    "gpt_neox": ({"model_type": "gpt_neox"}, "gpt_neox.layers",
                 {"attention.query_key_value": ((3 * H, H), "qkv"), "attention.dense": ((H, H), "o"),
                  "mlp.dense_h_to_4h": ((F, H), "up"), "mlp.dense_4h_to_h": ((H, F), "down")},
                 {"gpt_neox.embed_in.weight": ((64, H), "embedding"), "embed_out.weight": ((64, H), "lm_head")}),
    "falcon": ({"model_type": "falcon"}, "transformer.h",
               {"self_attention.query_key_value": ((3 * H, H), "qkv"), "self_attention.dense": ((H, H), "o"),
                "mlp.dense_h_to_4h": ((F, H), "up"), "mlp.dense_4h_to_h": ((H, F), "down")},
               {"transformer.word_embeddings.weight": ((64, H), "embedding")}),
    "phi3": ({"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": H},
             "model.layers",
             {"self_attn.qkv_proj": ((2 * H, H), "qkv"), "self_attn.o_proj": ((H, H), "o"),
              "mlp.gate_up_proj": ((2 * F, H), "gate_up"), "mlp.down_proj": ((H, F), "down")}, {}),
    "mixtral": ({"model_type": "mixtral"}, "model.layers",
                {"self_attn.q_proj": ((H, H), "q"), "block_sparse_moe.gate": ((4, H), "router"),
                 **{f"block_sparse_moe.experts.{j}.w{w}": (((F, H) if w != 2 else (H, F)), role)
                    for j in range(4) for w, role in ((1, "gate"), (2, "down"), (3, "up"))}}, {}),
}


def _build(tmp_path, arch: str, shards: int, with_config: bool = True):
    config, prefix, modules, extra = LAYOUTS[arch]
    expected = {}
    for layer in range(3):
        expected.update({k: (s, r, layer) for k, (s, r) in _block(prefix, layer, modules).items()})
    expected.update({k: (s, r, None) for k, (s, r) in extra.items()})
    tensors = {name: (random_matrix(*shape, seed=i) if len(shape) == 2 else torch.ones(shape))
               for i, (name, (shape, _, _)) in enumerate(expected.items())}
    folder = write_checkpoint(tmp_path / arch, tensors, shards=shards,
                              config={**config, "num_hidden_layers": 3} if with_config else None)
    return folder, expected


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("arch", LAYOUTS)
def test_layout_maps_every_tensor(tmp_path, arch, shards):
    folder, expected = _build(tmp_path, arch, shards)
    ckpt = open_checkpoint(folder)
    scheme = detect_scheme(ckpt.config, ckpt.names)
    assert scheme.name == ("llama" if arch == "qwen2" else arch)
    for name, (shape, role, layer) in expected.items():
        got = scheme.classify(name, shape, "F32")
        if layer is None:
            assert got.kind == role, name
            assert got.layer is None or role in ("norm", "bias"), name
        else:
            assert (got.layer, got.role) == (layer, role), name
            assert got.kind in ("projection", "expert", "router"), name
            assert got.module == name.removesuffix(".weight")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "phi3"])
def test_architecture_detected_from_names_without_config(tmp_path, arch):
    folder, _ = _build(tmp_path, arch, 1, with_config=False)
    ckpt = open_checkpoint(folder)
    assert detect_scheme({}, ckpt.names).name == arch


def test_unknown_architecture_falls_back_to_generic_rule(tmp_path):
    tensors = {f"net.blocks.{i}.mix.weight": random_matrix(16, 16, i) for i in range(3)}
    tensors["net.head.weight"] = random_matrix(16, 16, 9)
    table = scan(write_checkpoint(tmp_path, tensors), progress=False)
    assert table.attrs["naming"] == "generic"
    rows = table.set_index("name")
    assert rows.loc["net.blocks.2.mix.weight", "layer"] == 2
    assert rows.loc["net.blocks.2.mix.weight", "role"] == "mix"
    assert rows.loc["net.head.weight", "kind"] == "other"


def test_scan_of_sharded_llama_rows_and_layer_means(tmp_path):
    folder, expected = _build(tmp_path, "llama", 3)
    table = scan(folder, progress=False)
    projections = table[table.kind == "projection"]
    assert len(projections) == 21
    down = projections[projections.role == "down"].iloc[0]
    assert (down.out_features, down.in_features) == (H, F)
    assert list(projections.layer) == sorted(projections.layer)
    assert set(table.kind) == {"projection", "embedding", "lm_head"}  # the norm is 1-D, not a matrix
    summary = layer_summary(table)
    assert list(summary.layer) == [0, 1, 2]
    assert (summary.num_matrices == 7).all()
    layer1 = projections[projections.layer == 1]
    assert summary.loc[1, "alpha_hill"] == pytest.approx(layer1.alpha_hill.mean())


def test_gpt2_conv1d_orientation_and_fused_split(tmp_path):
    folder, _ = _build(tmp_path, "gpt2", 1)
    ckpt = open_checkpoint(folder)
    table = scan(folder, split_fused=True, progress=False).set_index("name")
    fused = table.loc["h.0.attn.c_attn.weight"]
    assert (fused.N, fused.M, fused.kind) == (3 * H, H, "projection")
    assert (fused.out_features, fused.in_features) == (3 * H, H)  # stored (in, out) = (H, 3H)
    weight = ckpt.load("h.0.attn.c_attn.weight")  # Conv1D stores (in, out): split along dim 1
    for j, part in enumerate("qkv"):
        row = table.loc[f"h.0.attn.c_attn.weight:{part}"]
        assert (row.kind, row.role, row["shape"]) == ("part", part, f"{H}x{H}")
        eigs = torch.linalg.eigvalsh(weight[:, j * H:(j + 1) * H].double().T @ weight[:, j * H:(j + 1) * H].double())
        assert row.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-9)
    # parts are reported but not double-counted in the layer means
    assert layer_summary(table.reset_index()).loc[0, "num_matrices"] == 4


def test_phi3_fused_parts_follow_attention_config(tmp_path):
    folder, _ = _build(tmp_path, "phi3", 1)
    table = scan(folder, split_fused=True, progress=False).set_index("name")
    head_dim = H // 4
    assert table.loc["model.layers.0.self_attn.qkv_proj.weight:q", "shape"] == f"{4 * head_dim}x{H}"
    assert table.loc["model.layers.0.self_attn.qkv_proj.weight:k", "shape"] == f"{2 * head_dim}x{H}"
    assert table.loc["model.layers.0.mlp.gate_up_proj.weight:up", "shape"] == f"{F}x{H}"
    assert "model.layers.0.self_attn.qkv_proj.weight:q" not in scan(folder, progress=False).name.values


def test_mixtral_stacked_3d_experts_are_split_per_expert(tmp_path):
    experts = 4
    gate_up = torch.stack([random_matrix(2 * F, H, seed=j) for j in range(experts)])
    down = torch.stack([random_matrix(H, F, seed=10 + j) for j in range(experts)])
    tensors = {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down,
               "model.layers.0.mlp.gate.weight": random_matrix(experts, H, 99),
               "model.layers.0.self_attn.q_proj.weight": random_matrix(H, H, 98)}
    table = scan(write_checkpoint(tmp_path, tensors, config={"model_type": "mixtral"}), progress=False)
    experts_rows = table[table.kind == "expert"].set_index("name")
    assert len(experts_rows) == 2 * experts
    row = experts_rows.loc["model.layers.0.mlp.experts.gate_up_proj[2]"]
    assert (row.role, row.expert, row.layer, row["shape"]) == ("gate_up", 2, 0, f"{2 * F}x{H}")
    eigs = torch.linalg.eigvalsh(gate_up[2].double().T @ gate_up[2].double())
    assert row.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-9)
    router = table.set_index("name").loc["model.layers.0.mlp.gate.weight"]
    assert router.kind == "router" and router.status == "too_few_evals"


def test_peft_adapter_names_map_to_base_modules(tmp_path):
    from safetensors.torch import save_file
    tensors = {"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": random_matrix(8, H, 1),
               "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight": random_matrix(H, 8, 2)}
    (tmp_path / "a").mkdir()
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    table = scan(tmp_path / "a", progress=False)
    assert list(table.layer) == [3, 3] and list(table.role) == ["q", "q"]
    assert list(table.part) == ["lora_A", "lora_B"]
    assert set(table.module) == {"model.layers.3.self_attn.q_proj"}


@pytest.mark.parametrize("relative, role", [
    # DeepSeek V4 as stored (attn.indexer.*) and as transformers builds it (self_attn.compressor.indexer.*)
    ("attn.indexer.weights_proj", "idx_weights"),
    ("self_attn.compressor.indexer.scorer.weights_proj", "idx_weights"),
    ("attn.indexer.wq_b", "idx_q_b"),
    ("self_attn.compressor.indexer.q_b_proj", "idx_q_b"),
    ("attn.indexer.compressor.wgate", "idx_gate"),
    ("self_attn.compressor.indexer.gate_proj", "idx_gate"),
    ("attn.indexer.compressor.wkv", "idx_kv"),
    ("self_attn.compressor.indexer.kv_proj", "idx_kv"),
    # the attention's own KV compressor: never the MLP's "gate"
    ("attn.compressor.wgate", "attn_compress_gate"),
    ("self_attn.compressor.gate_proj", "attn_compress_gate"),
    ("self_attn.compressor.kv_proj", "attn_compress_kv"),
])
def test_one_module_one_role_whatever_its_path(relative, role):
    from layerscope.checkpoint.architectures import mixer_of_role
    from layerscope.checkpoint.naming import shared_vocabulary_role

    assert shared_vocabulary_role(relative)[0] == role
    assert mixer_of_role(role) == "attention"
