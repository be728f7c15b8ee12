"""One model type through the whole pipeline, as transformers builds it: the zoo's assertions.

:func:`check` builds the tiny model, saves it, scans it (in memory too: the same rows) and asserts that every Linear inside a block
maps to its stack, layer and live module name with a role; plans it (one expert per module and a
mixture), exports the one-expert plan to PEFT and builds it with real PEFT (exactly the planned
modules adapted), and applies the mixture with the runtime (output unchanged at initialisation,
adapters saved and loaded back identical).  It returns facts for the README's table.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from layerscope.checkpoint.architectures import NORM_CONTAINER
from tests.zoo_models import ZooEntry, build

TOWER_NOTE = "towers"


def _peft_config(single) -> dict:
    from layerscope.export.formats import to_peft_config

    config = to_peft_config(single)
    return {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path", "inference_mode",
                                                         "task_type")}


def _forward(model, vocab: int):
    """The model's output on a fixed batch of token ids (None when it needs other inputs, e.g. audio)."""
    torch.manual_seed(1)
    ids = torch.randint(3, max(4, min(vocab, 200)), (1, 8))
    kwargs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(**kwargs)
    except Exception:  # noqa: BLE001 - the base model itself cannot run on token ids alone
        return None
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = getattr(out, "last_hidden_state", None)
    return logits


def expected_linears(model) -> dict[str, tuple[str, int]]:
    """live module path → (stack, layer) for every Linear/Conv1D inside a block, from the built model alone."""
    from layerscope.checkpoint.modeltree import tree_of_model

    tree = tree_of_model(model)
    expected = {}
    for name in tree.linears:
        hit = tree.block_of(name)
        if hit is not None:
            stack, index, _ = hit
            expected[name] = (stack.name, tree.offset(stack) + index)
    return expected


def unaccounted_weights(folder: Path, table) -> list[str]:
    """Every floating tensor of two or more dimensions must be a row of the scan or named in its not_analysed
    facts; the ones that are neither."""
    from layerscope.checkpoint.dtypes import FLOATING
    from layerscope.checkpoint.quantization import logical_tensors
    from layerscope.checkpoint.reader import open_checkpoint

    rows = set(table["tensor"].dropna().astype(str))
    named = {entry["tensor"] for entry in table.attrs.get("not_analysed") or []}
    return [t.name for t in logical_tensors(open_checkpoint(folder))
            if len(t.shape) >= 2 and t.analysable_dtype in FLOATING and t.name not in rows | named]


def inconsistent_roles(table) -> dict[str, list[str]]:
    """Block-relative module paths (layer index replaced by N) that carry more than one role across layers."""
    rows = table[table["module"].notna() & table["role"].notna() & table["layer"].notna()]
    roles: dict[str, set[str]] = {}
    for module, role in zip(rows["module"], rows["role"]):
        relative = re.sub(r"\.\d+\.", ".N.", str(module), count=1)
        roles.setdefault(relative, set()).add(re.sub(r"^expert\.\d+\.", "expert.J.", str(role)))
    return {path: sorted(found) for path, found in roles.items() if len(found) > 1}


IDENTITY = ["name", "tensor", "kind", "stack", "layer", "stack_layer", "role", "module", "expert", "part", "N", "M"]


def same_rows_in_memory(model, folder_table) -> None:
    """The model in memory scans to its saved folder's rows: the same names, roles and values, in the same order
    (a model transformers fused on load is seen in its stored layout)."""
    import numpy as np

    from layerscope import scan

    memory = scan(model, estimators=("alpha_hill",), progress=False)
    ours, theirs = (t[IDENTITY].astype(object).where(t[IDENTITY].notna(), "").astype(str).reset_index(drop=True)
                    for t in (memory, folder_table))
    assert list(ours["name"]) == list(theirs["name"]), \
        f"in memory {sorted(set(ours['name']) ^ set(theirs['name']))[:4]} differ from the folder's rows"
    for column in IDENTITY:
        differ = ours[column] != theirs[column]
        assert not differ.any(), f"{column} of {ours['name'][differ].iloc[0]}: {ours[column][differ].iloc[0]!r} in " \
                                 f"memory, {theirs[column][differ].iloc[0]!r} from the folder"
    np.testing.assert_allclose(memory["alpha_hill"].to_numpy(float), folder_table["alpha_hill"].to_numpy(float),
                               rtol=1e-9, equal_nan=True)


def peft_targets(peft_model) -> set[str]:
    """What PEFT adapted: each LoRA-wrapped module, and each wrapped fused parameter (target_parameters) by its
    parameter name (``…mlp.experts.down_proj``)."""
    out = set()
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and isinstance(getattr(module, "r", None), dict)):
            continue
        name = name.removeprefix("base_model.model.")
        parameter = getattr(module, "parameter_name", None)
        out.add(f"{name.replace('.base_layer', '')}.{parameter}" if parameter else name)
    return out


def check(entry: ZooEntry, folder: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    from layerscope import plan, scan
    from layerscope.errors import LayerscopeError
    from layerscope.export.formats import peft_refused
    from layerscope.runtime import apply_plan, load_adapters, save_adapters
    from layerscope.runtime.io import adapter_state

    config, model = build(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    same_rows_in_memory(model, table)
    facts = {"naming": table.attrs["naming"], "stacks": table.attrs["stacks"], "towers": table.attrs["towers"],
             "live_names": table.attrs["live_names"]}
    assert table.attrs["live_names"], table.attrs.get("live_names_note")
    assert not table.attrs["unmapped"], f"unmapped block Linears: {table.attrs['unmapped']}"
    missing_weights = unaccounted_weights(folder, table)
    assert not missing_weights, f"weights neither analysed nor named with a reason: {missing_weights[:3]}"
    facts["not_analysed"] = len(table.attrs["not_analysed"])
    mixed = inconsistent_roles(table)
    assert not mixed, f"one module, several roles across layers: {dict(list(mixed.items())[:2])}"

    # 1. every block Linear of the built model is in the scan, at its stack and layer, under its live name
    expected = expected_linears(model)
    assert expected, "no Linear inside any block"
    rows = table[table["part"].isna()].drop_duplicates("module").set_index("module", drop=False)
    tied = {n for n, (_, _) in expected.items() if n not in rows.index}
    stored_params = {name.removesuffix(".weight") for name, _ in model.named_parameters()}
    stack_names: dict[str, str] = {}
    for module, (stack, layer) in expected.items():
        if module in tied:
            assert module in stored_params or True  # not stored under its own name (tied): nothing to scan
            continue
        row = rows.loc[module]
        in_norm = row["kind"] == "norm" and re.search(NORM_CONTAINER, module.rpartition(".")[0])
        assert row["kind"] in ("projection", "router", "expert") or in_norm, f"{module}: kind {row['kind']}"
        assert int(row["layer"]) == layer, f"{module}: layer {row['layer']}, the module tree says {layer}"
        # Stack names are conventions (the naming tables call BERT's blocks an encoder even in BertLMHeadModel):
        # what must hold is that the scan's stacks split the blocks exactly as the module tree's do.
        named_as = stack_names.setdefault(stack, row["stack"])
        assert row["stack"] == named_as, f"{module}: stack {row['stack']}, its stack-mates are {named_as}"
    assert len(set(stack_names.values())) == len(stack_names), f"two stacks merged: {stack_names}"
    facts["mixers"] = sorted(set(table["mixer"].dropna()))
    facts["experts"] = bool((table["kind"].isin(["expert", "expert_stack"])).any())
    missing = sorted(tied)
    facts["not_stored"] = len(missing)

    # 2. plans name live modules; real PEFT adapts exactly them
    layers = sorted(set(table[(table["kind"] == "projection") & ~table["stack"].isin(facts["towers"])]["layer"]))
    single = plan(table, "adaptive-lora", progress=False)
    moe = plan(table, "alphalora", metric="alpha_hill", total_experts=2 * len(layers), progress=False)
    planned = {m["name"] for m in single.modules()}
    live_modules = {name for name, _ in model.named_modules()}
    assert planned <= live_modules, f"planned names the model lacks: {sorted(planned - live_modules)[:3]}"
    assert not any(table.set_index("module").loc[list(planned), "stack"].isin(facts["towers"])), "tower planned"
    refused = peft_refused(single, single.modules())
    if refused:  # PEFT retargets or refuses these by name: the export says so; plan the other roles for PEFT
        with pytest.raises(LayerscopeError, match="PEFT"):
            _peft_config(single)
        refused_roles = {m["role"] for m in single.modules() if m["name"] in refused}
        keep = sorted(set(single.document["target_roles"]) - refused_roles)
        single = plan(table, "adaptive-lora", target_roles=keep, progress=False)
        planned = {m["name"] for m in single.modules()}
        facts["peft_scope"] = f"without {', '.join(sorted(refused_roles))}"
    peft_config = _peft_config(single)
    _, fresh = build(entry)
    peft_model = get_peft_model(fresh, LoraConfig(**peft_config))
    adapted = peft_targets(peft_model)
    assert adapted == planned, f"PEFT adapted {sorted(adapted ^ planned)[:4]} beyond/short of the plan"
    facts["planned_modules"] = len(planned)

    # 3. the runtime applies the mixture: output unchanged at init, adapters round-trip
    _, base = build(entry)
    vocab = getattr(base.config.get_text_config(), "vocab_size", 256) or 256
    before = _forward(base, vocab)
    live = apply_plan(base, moe, verbose=False)
    after = _forward(live, vocab)
    if before is not None:
        assert after is not None and torch.allclose(before, after, atol=1e-5), "applied plan changed the output at init"
    facts["forward"] = before is not None
    with torch.no_grad():  # non-zero values everywhere, then save and reload
        for param in adapter_state(live).keys():
            torch.nn.init.normal_(live.get_parameter(param), std=0.02)
    saved = save_adapters(live, folder / "adapters")
    _, other = build(entry)
    reloaded = load_adapters(other, saved)
    mine, theirs = adapter_state(live), adapter_state(reloaded)
    assert mine and mine.keys() == theirs.keys(), "adapters did not round-trip"
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), "adapter values did not round-trip"
    json.dumps(moe.document)
    return facts
