"""``export_plan``: one plan to any export format, with the model check; the formats live beside it."""

from __future__ import annotations

import json
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.export.formats import (
    base_model,
    mola_command_line,
    to_mola_args,
    to_peft_config,
    to_table,
    unplanned_suffix_matches,
)
from layerscope.export.trainers import (
    check_peft_keys,
    checkpoint_module_names,
    checkpoint_parameter_names,
    export_modules,
    mixlora_json,
    to_axolotl_yaml,
)
from layerscope.names import EXPORT_FORMATS
from layerscope.planning.matching import checkpoint_shapes, plan_difference, require_same_model
from layerscope.planning.plan import Plan
from layerscope.tables import atomic_write

EXPORTERS = EXPORT_FORMATS


def export_plan(plan: Plan, fmt: str, out: Path | None = None, *, round_ranks: str | None = None,
                check_model: str | Path | None = None, allow_other_model: bool = False) -> str:
    """Render (and, with ``out``, atomically write) an export; returns the text.

    ``round_ranks``: round every rank up to a serving engine's set (``vllm``).  ``check_model``: a
    checkpoint that must be the plan's model (module shapes, layer count, fingerprint; unless
    ``allow_other_model``) and whose module names every PEFT pattern key / target must match exactly once.
    """
    if check_model is not None:
        shapes, num_layers, fingerprint = checkpoint_shapes(check_model)
        require_same_model(plan_difference(plan, shapes, num_layers, fingerprint, str(check_model)),
                           plan.source, allow_other_model)
    modules = export_modules(plan, round_ranks)
    fused = [m["name"] for m in modules if "model_experts" in m]
    if fused and fmt not in ("peft", "csv"):
        raise LayerscopeError(f"{plan.source}: --format {fmt} cannot target the model's fused expert MLPs "
                              f"({fused[0]}); export --format peft (target_parameters)")
    base = base_model(plan, check_model)
    if round_ranks is not None and fmt == "mola":
        raise LayerscopeError("--round-ranks applies to the peft, axolotl, mixlora and csv exports")
    if fmt == "peft":
        config = to_peft_config(plan, base, modules=modules)
        if check_model is not None:
            check_peft_keys(config, checkpoint_module_names(str(check_model)), str(check_model),
                            checkpoint_parameter_names(str(check_model)))
        text = json.dumps(config, indent=2) + "\n"
    elif fmt == "mola":
        args = to_mola_args(plan)
        if check_model is not None:
            extra = unplanned_suffix_matches(plan, args["lora_target_modules"].split(","),
                                             checkpoint_module_names(str(check_model)))
            if extra:
                raise LayerscopeError(f"{check_model}: MoLA's target list {args['lora_target_modules']} would also "
                                      f"adapt {extra[0]} (and {len(extra) - 1} more), which the plan does not name")
        text = mola_command_line(args) + "\n"
    elif fmt == "csv":
        text = to_table(plan, modules).to_csv(index=False)
    elif fmt == "axolotl":
        text = to_axolotl_yaml(plan, modules, base)
        if check_model is not None:
            config = to_peft_config(plan, base, modules=modules)
            check_peft_keys(config, checkpoint_module_names(str(check_model)), str(check_model),
                            checkpoint_parameter_names(str(check_model)))
    elif fmt == "mixlora":
        text = mixlora_json(plan, modules, base)
    else:
        raise LayerscopeError(f"--format {fmt!r}: expected one of {', '.join(EXPORTERS)}")
    if out is not None:
        atomic_write(Path(out), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return text
