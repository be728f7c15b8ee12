"""Live module names, towers and hybrid token mixers on the families issue 17 found broken.

Each model is built tiny by transformers itself (``tests.zoo_models``), saved by ``save_pretrained``
and read back, so the stored names are what transformers writes and the live names what it builds.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import layerscope  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.runtime import apply_plan, save_adapters  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.zoo_models import build, registry  # noqa: E402

ENTRIES = {e.model_type: e for e in registry()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            _, model = build(ENTRIES[model_type])
            folder = tmp_path_factory.mktemp(model_type)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(folder)
            cache[model_type] = (folder, layerscope.scan(folder, estimators=("alpha_hill",), progress=False))
        return cache[model_type]

    return get


def _cli(*args):
    return run_cli(*args)


def test_gemma3_keeps_stored_names_and_plans_live_ones(saved):
    folder, table = saved("gemma3")
    q = table[table["module"] == "model.language_model.layers.0.self_attn.q_proj"].iloc[0]
    assert q["tensor"] == "language_model.model.layers.0.self_attn.q_proj.weight"  # as stored
    assert (q["stack"], int(q["layer"]), q["role"], q["mixer"]) == ("decoder", 0, "q", "attention")
    assert table.attrs["live_names"] and table.attrs["towers"] == ["vision"]


def test_a_vision_tower_is_its_own_stack_after_the_language_model(saved):
    _, table = saved("gemma3")
    blocks = table[table["layer"].notna()].drop_duplicates("layer").sort_values("layer")
    language = blocks[blocks["stack"] == "decoder"]
    vision = blocks[blocks["stack"] == "vision"]
    assert list(language["layer"].astype(int)) == list(range(len(language)))
    assert list(vision["layer"].astype(int)) == list(range(len(language), len(language) + len(vision)))
    assert list(vision["stack_layer"].astype(int)) == list(range(len(vision)))
    assert table.attrs["num_layers"] == len(language) + len(vision)


def test_plans_cover_the_language_model_unless_towers_are_asked_for(saved):
    _, table = saved("gemma3")
    default = {m["name"] for m in layerscope.plan(table, "uniform", progress=False).modules()}
    assert default and all(name.startswith("model.language_model.layers.") for name in default)
    both = {m["name"] for m in layerscope.plan(table, "uniform", include_towers=True, progress=False).modules()}
    towers = both - default
    assert towers and all(name.startswith("model.vision_tower.") for name in towers)
    language_only = layerscope.plan(table, "uniform", progress=False)
    # the plan names both facts: blocks in the checkpoint (language + vision) and the depth it plans
    assert language_only.model["num_layers"] == table.attrs["num_layers"]
    assert language_only.model["planned_depth"] == len(language_only.layers) < language_only.model["num_layers"]


def test_peft_export_targets_exactly_the_planned_live_modules(saved, tmp_path):
    folder, table = saved("gemma3")
    plan_path = tmp_path / "plan.json"
    layerscope.plan(table, "uniform", progress=False).save(plan_path)
    result = _cli("export", str(plan_path), "--format", "peft", "--out", str(tmp_path / "peft"),
                  "--check-model", str(folder))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "peft").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    names = [n for n, _ in model.named_modules()]
    for target in config["target_modules"]:
        assert [n for n in names if n == target or n.endswith("." + target)] == [target]


def test_apply_and_merge_a_composite_model_write_the_checkpoint_names(saved, tmp_path):
    folder, table = saved("gemma3")
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    plan = layerscope.plan(table, "uniform", progress=False)
    apply_plan(model, plan, verbose=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    adapter = save_adapters(model, tmp_path / "adapter")
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    result = _cli("merge", str(folder), str(adapter), "--out", str(tmp_path / "merged"), "-q")
    assert result.returncode == 0, result.stderr
    with safe_open(str(folder / "model.safetensors"), "pt") as old, \
            safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as new:
        assert list(old.keys()) == list(new.keys())  # stored names, not live ones
        key = "language_model.model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(old.get_tensor(key), new.get_tensor(key))
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type, roles, mixer", [
    ("qwen3_next", {"lin_qkvz", "lin_ba", "lin_o"}, "linear_attention"),
    ("jamba", {"ssm_in", "ssm_out", "ssm_x", "ssm_dt"}, "mamba"),
    ("nemotron_h", {"ssm_in", "ssm_out"}, "mamba"),
    ("lfm2", {"conv_in", "conv_out"}, "conv"),
])
def test_hybrid_token_mixers_have_roles_and_a_mixer_kind(saved, model_type, roles, mixer):
    _, table = saved(model_type)
    mixing = table[(table["kind"] == "projection") & (table["mixer"] == mixer)]
    assert roles <= set(mixing["role"])
    assert not table["tensor"].str.endswith("conv1d.weight").any()  # conv kernels are no matrices to analyse
    layers = layerscope.layer_summary(table)
    assert mixer in set(layers["mixer"].dropna().str.split("+").explode())
    planned = {m["role"] for m in layerscope.plan(table, "uniform", progress=False).modules()}
    assert roles <= planned  # planned like attention


def test_mamba_parameters_and_conv_kernels_are_never_planned(saved):
    _, table = saved("jamba")
    a_log = table[table["tensor"].str.endswith("mamba.A_log")]
    assert a_log.empty or set(a_log["kind"]) == {"param"}
    planned = {m["name"] for m in layerscope.plan(table, "uniform", progress=False).modules()}
    assert not any("conv1d" in name or "A_log" in name for name in planned)


def test_deepseek_v4_router_and_experts_are_not_projections(saved):
    _, table = saved("deepseek_v4")
    gates = table[table["module"].str.endswith("ffn.gate") | table["module"].str.endswith("mlp.gate")]
    assert len(gates) and set(gates["kind"]) == {"router"}
    assert (table["kind"] == "expert").any()
    plan = layerscope.plan(table, "alphalora", metric="alpha_hill", progress=False)
    assert all(m["role"] not in ("router",) for m in plan.modules())


def test_hunyuan_shared_mlp_is_a_shared_expert(saved):
    _, table = saved("hunyuan_v1_moe")
    shared = table[table["module"].str.contains("shared_mlp")]
    assert len(shared) and set(shared["role"]) <= {"shared_gate", "shared_up", "shared_down"}


def test_a_linear_directly_in_the_block_has_a_role(saved):
    """Zamba's hybrid layer projects the shared transformer's output with a bare ``linear``; Zamba2 adds
    per-layer adapter lists: both are named now (they used to be unmapped)."""
    _, table = saved("zamba")
    assert not table.attrs["unmapped"]
    linear = table[table["module"].astype(str).str.fullmatch(r"model\.layers\.\d+\.linear")]
    assert len(linear) and set(linear["role"]) == {"block_linear"} and set(linear["kind"]) == {"projection"}


def test_unmapped_block_linears_are_reported_and_refused(tmp_path):
    import torch

    from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint

    tensors = llama_tensors(layers=2, hidden=32, inter=48)
    tensors["model.layers.1.mystery_mixer.weight"] = torch.randn(32, 32)
    folder = write_checkpoint(tmp_path / "m", tensors, config={**LLAMA_CONFIG, "num_hidden_layers": 2,
                                                               "hidden_size": 32})
    table = layerscope.scan(folder, progress=False)
    assert table.attrs["unmapped"] == ["model.layers.1.mystery_mixer"]
    with pytest.raises(LayerscopeError, match="no known role.*--allow-unmapped"):
        layerscope.plan(table, "uniform", progress=False)
    planned = layerscope.plan(table, "uniform", allow_unmapped=True, progress=False)
    assert not {m["name"] for m in planned.modules()} & set(table.attrs["unmapped"])
    result = _cli("plan", str(folder), "--strategy", "uniform", "-q")
    assert result.returncode == 2 and "--allow-unmapped" in result.stderr and len(result.stderr.splitlines()) == 1
    assert _cli("plan", str(folder), "--strategy", "uniform", "-q", "--allow-unmapped").returncode == 0


def test_without_live_names_the_tables_are_used(saved):
    folder, _ = saved("llama")
    table = layerscope.scan(folder, estimators=("alpha_hill",), live_names=False, progress=False)
    assert not table.attrs["live_names"] and table.attrs["naming"] == "llama"


def test_depth_strategies_count_depth_within_each_stack(saved):
    _, table = saved("gemma3")
    stacks = table[table["layer"].notna()].drop_duplicates("layer").set_index("layer")["stack"]
    language = sorted(int(layer) for layer, stack in stacks.items() if stack == "decoder")
    vision = sorted(int(layer) for layer, stack in stacks.items() if stack == "vision")
    hilo = layerscope.plan(table, "hilo", ranks=(2, 8), include_towers=True, progress=False)
    rank = {layer["layer"]: layer["rank"] for layer in hilo.layers}
    # the first blocks of each stack get the low tier, the last ones the high tier
    assert rank[language[0]] == rank[vision[0]] == 2 and rank[language[-1]] == rank[vision[-1]] == 8
    adaptive = layerscope.plan(table, "adaptive-lora", include_towers=True, progress=False)
    ranks = {layer["layer"]: layer["rank"] for layer in adaptive.layers}
    assert ranks[vision[0]] == ranks[language[0]] == 16  # linear decay restarts at each stack's first block
    text = __import__("layerscope.planning.explain", fromlist=["explain_text"]).explain_text(hilo)
    assert "vision" in text and "decoder" in text and "planned" in text


def test_weights_held_as_bare_parameters_get_the_kind_of_what_they_are(tmp_path):
    """JetMoE keeps its experts in ParallelExperts modules (one (experts, out, in) parameter, no Linear): the
    feed-forward experts are experts (gate_up, down), and so are the attention's (its query and output
    projections), not kind 'param'."""
    import layerscope
    from tests.zoo_models import ZooEntry, build

    _, model = build(ZooEntry("jetmoe", "causal-lm", "AutoModelForCausalLM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    table = layerscope.scan(tmp_path, progress=False).set_index("name")
    experts = model.config.num_local_experts
    for j in range(experts):
        assert table.loc[f"model.layers.0.mlp.input_linear.weight[{j}]", ["kind", "role"]].tolist() == [
            "expert", "gate_up"]
        assert table.loc[f"model.layers.0.mlp.output_linear.weight[{j}]", "role"] == "down"
        assert table.loc[f"model.layers.0.self_attention.experts.input_linear.weight[{j}]", "role"] == "q"
        assert table.loc[f"model.layers.0.self_attention.experts.output_linear.weight[{j}]", "role"] == "o"
    assert "param" not in set(table["kind"])


def test_deepseek_v4_grouped_output_projection_is_kind_grouped(saved):
    """DeepSeek V4's o_a_proj applies its weight per head group (not y = Wx): kind 'grouped', with the
    attention's role, one row per head group (group g's block of rows, the matrix the model applies to that
    group's input), analysed and never planned (it used to be kind 'param')."""
    folder, table = saved("deepseek_v4")
    grouped = table[table["module"].astype(str).str.endswith("self_attn.o_a_proj")]
    assert len(grouped) and set(grouped["kind"]) == {"grouped"} and set(grouped["mixer"]) == {"attention"}
    config = json.loads((folder / "config.json").read_text())
    groups = config["o_groups"]
    first = grouped[grouped["layer"] == 0]
    assert list(first["part"]) == [f"group.{g}" for g in range(groups)] and groups > 1
    from safetensors.torch import load_file

    stored = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    weight = stored[first["tensor"].iloc[0]].double()
    block = weight.shape[0] // groups
    for g, row in enumerate(first.itertuples(index=False)):
        part = weight[g * block:(g + 1) * block]
        assert (row.out_features, row.in_features) == tuple(part.shape)
        eigs = torch.linalg.eigvalsh(part @ part.T if part.shape[0] <= part.shape[1] else part.T @ part)
        assert row.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-9)
    plan = layerscope.plan(table, "uniform", progress=False)
    assert not any(m["name"].endswith("o_a_proj") for m in plan.modules())
