"""TempBalance / AlphaDecay per-layer optimizer settings: hand-computed maps and real parameter groups."""

from __future__ import annotations

import pytest
import torch

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.planning.optimizer import linear_map
from layerscope.runtime import apply_plan, optimizer_groups
from tests.builders import save_tiny_llama

transformers = pytest.importorskip("transformers")
ALPHAS = {0: 2.0, 1: 3.0, 2: 4.0}


def test_linear_map_by_hand():
    assert linear_map(ALPHAS, 0.5, 1.5) == {0: 0.5, 1: 1.0, 2: 1.5}
    decay = linear_map({0: 5.0, 1: 2.0, 2: 2.5}, 0.667, 3.0)
    assert decay[1] == pytest.approx(0.667) and decay[0] == pytest.approx(3.0)
    assert decay[2] == pytest.approx(0.667 + (0.5 / 3.0) * (3.0 - 0.667))
    assert linear_map({0: 3.0, 1: 3.0}, 0.5, 1.5) == {0: 1.0, 1: 1.0}  # undefined map: base setting


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=3)


def _table(folder):
    table = layerscope.scan(folder, estimators=("alpha_hill",), progress=False)
    targets = table["kind"] == "projection"
    table.loc[targets, "alpha_hill"] = table.loc[targets, "layer"].map(ALPHAS)
    return table


def test_plan_section_and_parameter_groups(folder):
    plan = layerscope.plan(_table(folder), "uniform", optimizer=["tempbalance", "alphadecay"], progress=False)
    section = plan.document["optimizer"]
    assert section["metric"] == "alpha_hill" and section["ranges"] == {"tempbalance": [0.5, 1.5],
                                                                       "alphadecay": [0.667, 3.0]}
    by_layer = {entry["layer"]: entry for entry in section["layers"]}
    assert [by_layer[layer]["lr_scale"] for layer in range(3)] == [0.5, 1.0, 1.5]
    assert [by_layer[layer]["weight_decay_scale"] for layer in range(3)] == pytest.approx([0.667, 1.8335, 3.0])
    reloaded = layerscope.Plan.loads(plan.to_json())  # the section survives the schema
    assert reloaded.document["optimizer"] == section

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    apply_plan(model, plan, verbose=False)
    groups = optimizer_groups(model, lr=1e-3, weight_decay=0.1)
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 1e-3, 1.5e-3])
    assert [g["weight_decay"] for g in groups] == pytest.approx([0.0667, 0.18335, 0.3])
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    optimizer = torch.optim.AdamW(groups)
    loss = model(input_ids=torch.randint(0, 64, (2, 6))).logits.square().mean()
    loss.backward()
    optimizer.step()


def test_groups_need_the_section(folder):
    plan = layerscope.plan(folder, "uniform", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    apply_plan(model, plan, verbose=False)
    with pytest.raises(LayerscopeError, match="no optimizer section"):
        optimizer_groups(model, lr=1e-3)
    with pytest.raises(LayerscopeError, match="--optimizer"):
        layerscope.plan(folder, "uniform", optimizer=["sgd"], progress=False)
