"""Is this plan (or activation table) for this model?  The first difference, or None.

Plans, scans and activation tables record the model's header fingerprint; wherever two of them are
combined (``report --plan/--activations``, ``export --check-model``) the pair must describe the same
model.  A fingerprint alone only says *that* they differ, so the comparison goes from the most
telling fact to the least: a planned module the model lacks or has in another shape, another layer
count, then other tensors (fingerprint).  ``--allow-other-model`` accepts a mismatch on purpose.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.planning.plan import Plan

ALLOW_FLAG = "--allow-other-model"


def plan_difference(plan: Plan, shapes: dict[str, tuple[int, int]], num_layers: int | None,
                    fingerprint: str | None, model: str) -> str | None:
    """``shapes``: live module name → (in_features, out_features) of the model."""
    for module in plan.modules() or [m for layer in plan.layers for m in layer["modules"]]:
        name = module["name"]
        if name not in shapes:
            return f"planned module {name} is not in {model}"
        if shapes[name] != (module["in_features"], module["out_features"]):
            in_f, out_f = shapes[name]
            return (f"planned module {name} is {module['in_features']} -> {module['out_features']} in the plan but "
                    f"{in_f} -> {out_f} in {model}")
    if num_layers is not None and num_layers != plan.model["num_layers"]:
        return f"the plan is for {plan.model['num_layers']} layers, {model} has {num_layers}"
    if fingerprint is not None and fingerprint != plan.model["fingerprint"] and not _same_gguf(model, plan):
        return f"{model} has other tensors than the plan's model (header fingerprint differs)"
    return None


def _same_gguf(model: str, plan: Plan) -> bool:
    """``model`` is the folder ``convert-gguf`` wrote from the GGUF file the plan was made from (or the reverse)."""
    from layerscope.checkpoint.gguf import converted_from

    source_of_model = converted_from(model)
    if source_of_model is not None:
        return source_of_model == plan.model["fingerprint"]
    source_of_plan = converted_from(str(plan.model.get("path") or ""))
    return source_of_plan is not None and source_of_plan == _fingerprint(model)


def _fingerprint(model: str) -> str | None:
    from layerscope.checkpoint.reader import open_checkpoint

    try:
        return open_checkpoint(model).fingerprint()
    except LayerscopeError:
        return None


def table_shapes(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    rows = table[table["module"].notna() & table["in_features"].notna() & table["part"].isna()] \
        if "part" in table.columns else table[table["module"].notna()]
    return {str(r.module): (int(r.in_features), int(r.out_features)) for r in rows.itertuples(index=False)}


def checkpoint_shapes(path: str | Path) -> tuple[dict[str, tuple[int, int]], int | None, str]:
    """(live module or fused expert parameter → (in, out), layer count, fingerprint) of a checkpoint, from its
    headers alone; a fused expert parameter has one expert's shape, as plans record it."""
    from layerscope.checkpoint.reader import open_checkpoint
    from layerscope.planning.inputs import expert_parameter_modules, header_rows

    ckpt = open_checkpoint(path)
    rows, scheme, _ = header_rows(ckpt)
    plain = rows[rows["kind"] != "expert"]
    shapes = {str(r.module): (int(r.in_features), int(r.out_features)) for r in plain.itertuples(index=False)
              if r.module is not None}
    for r in expert_parameter_modules(rows).itertuples(index=False):
        shapes[r.module] = (int(r.in_features), int(r.out_features))
    return shapes, scheme.num_layers or ckpt.num_layers, ckpt.fingerprint()


def scan_difference(table: pd.DataFrame, path: str | Path) -> str | None:
    """The first difference between a scan table and the checkpoint at ``path``: a scanned tensor it lacks or
    holds in another shape, else other tensors (fingerprint)."""
    from layerscope.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    column = "tensor" if "tensor" in table.columns else "name"
    for name in dict.fromkeys(str(n) for n in table[column].dropna()):
        if name not in ckpt.tensors and name.split("[")[0] not in ckpt.tensors:  # stacked experts: name[expert]
            return f"scanned tensor {name} is not in {path}"
    fingerprint = table.attrs.get("fingerprint")
    if fingerprint and fingerprint != ckpt.fingerprint():
        return f"{path} has other tensors than the scanned model (header fingerprint differs)"
    return None


def require_same_model(difference: str | None, what: str, allow: bool) -> None:
    if difference is not None and not allow:
        raise LayerscopeError(f"{what} was made for another model: {difference} ({ALLOW_FLAG} to use it anyway)")


def activations_difference(activations: pd.DataFrame, fingerprint: str | None, model: str,
                           modules: set[str] | None = None) -> str | None:
    """The first module the table measured that the model lacks, else a fingerprint difference."""
    if modules and "module" in activations.columns:
        measured = activations[activations["kind"] == "projection"] if "kind" in activations.columns else activations
        strangers = [str(m) for m in measured["module"].dropna() if str(m) not in modules]
        if strangers:
            return f"it measured module {strangers[0]}, which {model} does not have"
    measured = activations.attrs.get("fingerprint")
    if measured and fingerprint and measured != fingerprint:
        where = activations.attrs.get("path")
        return f"measured on {where or 'another model'}, whose header fingerprint differs from {model}'s"
    return None
