"""What the planner works from: the model's identity, its target modules and per-layer metrics.

Inputs come from a scan table (file or DataFrame) or straight from a checkpoint: a header-only
inventory when the strategy needs no spectra, a full scan when it does.  Module shapes are
always the real ones (from the scan or the safetensors headers), never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from layerscope.checkpoint.fusion import EXPERT_KINDS, expert_parameters
from layerscope.checkpoint.modeltree import ModelTree, model_facts, tree_for_checkpoint
from layerscope.checkpoint.naming import NamingScheme, detect_scheme
from layerscope.checkpoint.quantization import logical_tensors
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.errors import LayerscopeError
from layerscope.tables import FORMATS, read_scan

MODULE_COLUMNS = ["layer", "role", "module", "in_features", "out_features"]
# Numeric scan columns that say where a matrix is, not how it is: never a planning metric.
NOT_METRICS = frozenset({"layer", "stack_layer", "expert", "in_features", "out_features", "N", "M", "num_evals",
                         "model_experts"})
# A fused expert parameter's role from the projections it holds (gate and up are one parameter in memory).
FUSED_ROLES = {("gate", "up"): "gate_up"}
PARTS_OF_ROLE = {"gate_up": ("gate", "up")}


@dataclass(frozen=True)
class ModelIdentity:
    path: str
    architecture: str | None
    model_type: str | None
    naming: str
    num_layers: int
    fingerprint: str
    conv1d: bool = False
    stacks: tuple[dict, ...] = ()  # {"name", "depth", "tower"} of every block stack, in layer order
    task: str | None = None  # PEFT task type of the checkpoint's model class (CAUSAL_LM, SEQ_2_SEQ_LM ...)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("stacks", "task")}
        if self.stacks:
            out["stacks"] = [dict(s) for s in self.stacks]
        if self.task:
            out["task"] = self.task
        return out


@dataclass
class PlanInputs:
    model: ModelIdentity
    # one row per target module: MODULE_COLUMNS (+ metric columns from a scan); model_experts > 0 marks a fused
    # expert parameter (PEFT target_parameters) holding that many experts, each trained with its own LoRA
    modules: pd.DataFrame

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.modules["layer"].unique())

    @property
    def stack_layers(self) -> list[list[int]]:
        """The planned layers grouped by block stack, in layer order: depth-based strategies count depth within
        a stack (a vision tower's first blocks are not deeper than the language model's last)."""
        if "stack" not in self.modules.columns or self.modules["stack"].isna().all():
            return [self.layers]
        first = self.modules.groupby("layer")["stack"].first()
        groups: dict[str, list[int]] = {}
        for layer in self.layers:
            groups.setdefault(str(first.get(layer)), []).append(layer)
        return list(groups.values())

    @cached_property
    def shapes_by_layer(self) -> dict[int, list[tuple[str, int, int, int]]]:
        """layer → [(role, in_features, out_features, copies)] of its target modules; copies is the number of
        experts a fused expert parameter holds (one LoRA each), 1 for a module."""
        out: dict[int, list[tuple[str, int, int, int]]] = {}
        for m in self.modules.itertuples(index=False):
            out.setdefault(int(m.layer), []).append((m.role, int(m.in_features), int(m.out_features), copies_of(m)))
        return out

    @property
    def expert_parameters(self) -> pd.DataFrame:
        """The target rows that are fused expert parameters."""
        return self.modules[self.modules["model_experts"] > 0]

    def layer_metric(self, column: str) -> dict[int, float]:
        """Mean of a metric over each layer's target modules (AlphaLoRA's v_i)."""
        if column not in self.modules.columns:
            raise LayerscopeError(f"metric {column!r} is not in the scan table (scan with that estimator)")
        if not pd.api.types.is_numeric_dtype(self.modules[column]) or pd.api.types.is_bool_dtype(self.modules[column]):
            numeric = [c for c in self.modules.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(
                self.modules[c]) and not pd.api.types.is_bool_dtype(self.modules[c])]
            raise LayerscopeError(f"metric {column!r} is not a numeric column; metrics are: {', '.join(numeric)}")
        means = self.modules.groupby("layer")[column].mean()
        bad = [int(layer) for layer, v in means.items() if not math.isfinite(v)]
        if bad:
            raise LayerscopeError(f"metric {column!r} is NaN for every module of layer {bad[0]} (see the scan's status/note)")
        return {int(layer): float(v) for layer, v in means.items()}

    def restrict_roles(self, roles: list[str] | None) -> PlanInputs:
        """The target modules of these roles.  Without roles: every projection, and no expert MLP (a model's
        experts are adapted only when asked, e.g. ``--target-roles q,k,v,o,gate,up,down``).  gate and up are one
        fused parameter in memory, so they are asked for together."""
        modules = self.modules
        fused = modules["model_experts"] > 0
        if not roles:
            return PlanInputs(self.model, modules[~fused].reset_index(drop=True))
        known = set(modules["role"]) | {p for role in modules.loc[fused, "role"] for p in PARTS_OF_ROLE.get(role, ())}
        unknown = sorted(set(roles) - known)
        if unknown:
            raise LayerscopeError(f"--target-roles: {unknown} not in this model (has {sorted(known)})")
        for role in sorted(set(modules.loc[fused, "role"])):
            parts = PARTS_OF_ROLE.get(role, ())
            asked = [p for p in parts if p in roles]
            if asked and len(asked) < len(parts) and role not in roles:
                example = modules.loc[fused & (modules["role"] == role), "module"].iloc[0]
                raise LayerscopeError(f"--target-roles: {'/'.join(parts)} of the experts are one parameter in memory "
                                      f"({example}); name {' and '.join(parts)} together, or neither")
        chosen = modules["role"].isin(roles) | (fused & modules["role"].map(
            lambda role: bool(PARTS_OF_ROLE.get(role)) and set(PARTS_OF_ROLE[role]) <= set(roles)))
        return PlanInputs(self.model, modules[chosen].reset_index(drop=True))


def copies_of(module) -> int:
    """How many LoRAs one target row trains: the experts of a fused expert parameter, else 1."""
    experts = getattr(module, "model_experts", 0)
    return int(experts) if experts and experts > 0 else 1


def expert_parameter_modules(rows: pd.DataFrame) -> pd.DataFrame:
    """One target row per fused expert parameter of each layer (from its experts' scan rows): the projections it
    holds side by side (gate and up: out_features adds up), one expert's shape, its expert count, and each
    numeric metric averaged over its matrices."""
    if "parameter" not in rows.columns:
        return pd.DataFrame()
    experts = rows[(rows["kind"] == "expert") & rows["parameter"].notna() & rows["part"].isna()]
    out = []
    for (layer, parameter), group in experts.groupby(["layer", "parameter"], sort=False):
        one = group[group["expert"] == group["expert"].min()]
        roles = tuple(one["role"].astype(str))
        inputs = set(one["in_features"].astype(int))
        if len(inputs) != 1:
            raise LayerscopeError(f"{parameter}: its projections read inputs of different widths {sorted(inputs)}")
        row = {"kind": "expert", "stack": group["stack"].iloc[0], "layer": int(layer),
               "role": FUSED_ROLES.get(tuple(sorted(roles)), "+".join(roles)), "module": str(parameter),
               "in_features": inputs.pop(), "out_features": int(one["out_features"].astype(int).sum()),
               "model_experts": int(group["expert"].nunique())}
        for column in group.columns:
            if column not in row and column not in NOT_METRICS and pd.api.types.is_numeric_dtype(group[column]) \
                    and not pd.api.types.is_bool_dtype(group[column]):
                row[column] = float(group[column].mean())
        out.append(row)
    return pd.DataFrame(out)


def inputs_from_table(table: pd.DataFrame, source: str = "scan table", include_towers: bool = False,
                      allow_unmapped: bool = False) -> PlanInputs:
    """Plan inputs from a scan table: the projections of the language model's blocks (and of the
    vision/audio towers with ``include_towers``).

    A block Linear that no role names (``kind == "other"``) is refused unless ``allow_unmapped``:
    planning around it would silently leave part of every block without adapters.
    """
    missing = [c for c in MODULE_COLUMNS + ["kind"] if c not in table.columns]
    if missing:
        raise LayerscopeError(f"{source}: column {missing[0]!r} is missing (not a layerscope scan table?)")
    attrs = table.attrs
    for field in ("fingerprint", "naming"):
        if not attrs.get(field):
            raise LayerscopeError(f"{source}: model field {field!r} is missing (write scans as .parquet/.json, "
                                  "or keep the .model.json next to a .csv)")
    in_blocks = table[table["layer"].notna()]
    towers = set(attrs.get("towers") or [])
    if towers and not include_towers and "stack" in table.columns:
        in_blocks = in_blocks[~in_blocks["stack"].isin(towers)]
    unmapped = sorted(set(in_blocks[in_blocks["kind"] == "other"]["module"].dropna().astype(str)))
    if unmapped and not allow_unmapped:
        raise LayerscopeError(
            f"{source}: {len(unmapped)} Linear layer(s) inside the blocks have no known role, e.g. {unmapped[0]!r} "
            f"(all: {', '.join(unmapped[:6])}{' ...' if len(unmapped) > 6 else ''}); plan without them with "
            "--allow-unmapped, or report the layout")
    modules = in_blocks[in_blocks["kind"] == "projection"].copy()
    if modules.empty:
        raise LayerscopeError(f"{source}: no projection matrices inside layers to plan for")
    modules["model_experts"] = 0
    experts = expert_parameter_modules(in_blocks)
    if not experts.empty:
        modules = pd.concat([modules, experts], ignore_index=True)
    modules["layer"] = modules["layer"].astype(int)
    modules["model_experts"] = modules["model_experts"].fillna(0).astype(int)
    modules = modules.sort_values(["layer", "module"], kind="stable").reset_index(drop=True)
    num_layers = attrs.get("num_layers") or int(modules["layer"].max()) + 1
    identity = ModelIdentity(
        path=str(attrs.get("path", source)), architecture=attrs.get("architecture"),
        model_type=attrs.get("model_type"), naming=attrs["naming"], num_layers=int(num_layers),
        fingerprint=attrs["fingerprint"], conv1d=bool(attrs.get("conv1d", False)),
        stacks=tuple(attrs.get("stack_depths") or ()), task=attrs.get("task"),
    )
    return PlanInputs(identity, modules)


def inventory(path: str | Path, include_towers: bool = False, allow_unmapped: bool = False) -> PlanInputs:
    """Target modules and their shapes from the safetensors headers alone (no tensor is read)."""
    ckpt = open_checkpoint(path)
    table, scheme, tree = header_rows(ckpt)
    table.attrs.update(path=str(Path(path).resolve()), architecture=ckpt.architecture, model_type=ckpt.config.get("model_type"),
                       num_layers=scheme.num_layers or ckpt.num_layers, fingerprint=ckpt.fingerprint(),
                       **model_facts(scheme, tree, ckpt.config))
    return inputs_from_table(table, str(path), include_towers, allow_unmapped)


def header_rows(ckpt) -> tuple[pd.DataFrame, NamingScheme, ModelTree | None]:
    """The block matrices a scan would give rows for (projections, unmapped Linears, experts: one row per expert),
    with their shapes and, for experts, the live parameter holding them; from the headers alone."""
    tensors = logical_tensors(ckpt)
    tree, _ = tree_for_checkpoint(ckpt.config, ckpt.path)
    scheme = detect_scheme(ckpt.config, [t.name for t in tensors], tree)
    classified = [(info, scheme.classify(info.name, info.shape, info.analysable_dtype)) for info in tensors]
    parameters = expert_parameters(ckpt, tree, classified)
    rows = []
    for info, role in classified:
        if role.layer is None or role.kind not in ("projection", "other", *EXPERT_KINDS):
            continue
        place = {"stack": role.stack, "layer": role.layer, "role": role.role, "module": role.module, "part": None,
                 "parameter": parameters.get(info.name)}
        if role.kind == "expert_stack" and len(info.shape) == 3:  # one row per expert of a stored 3-D parameter
            out_f, in_f = (info.shape[2], info.shape[1]) if role.conv1d else info.shape[1:]
            rows += [{**place, "kind": "expert", "expert": j, "in_features": in_f, "out_features": out_f}
                     for j in range(info.shape[0])]
        elif len(info.shape) == 2:
            out_f, in_f = (info.shape[1], info.shape[0]) if role.conv1d else info.shape
            rows.append({**place, "kind": role.kind, "expert": role.expert, "in_features": in_f, "out_features": out_f})
    return pd.DataFrame(rows, columns=["kind", "stack", *MODULE_COLUMNS, "expert", "parameter", "part"]), scheme, tree


# Scan columns → the estimator that produces them (norm metrics come with every estimator).
ESTIMATOR_OF = {"xmin": "alpha", "D": "alpha", "D_peak": "alpha_peak", "xmin_peak": "alpha_peak",
                "xmin_hill": "alpha_hill", "alpha_farms": "alpha_farms", "xmin_farms": "alpha_farms",
                "num_spikes": "mp", "sigma_mp": "mp", "mp_softrank": "mp", "bulk_max": "mp",
                "bulk_min": "mp", "W_scale": "mp", "rand_mp_softrank": "rand", "ww_softrank": "rand",
                "rand_distance": "rand", "num_rand_spikes": "rand", "max_rand_eval": "rand",
                "alpha_hill": "alpha_hill", "alpha_peak": "alpha_peak", "matrix_rank": "rank", "rank_loss": "rank",
                "weak_rank_loss": "rank", "sv_max": "rank", "sv_min": "rank"}


def load_inputs(source, metric: str | None = None, progress: bool = True, also: tuple[str, ...] = (),
                include_towers: bool = False, allow_unmapped: bool = False) -> PlanInputs:
    """From a DataFrame, a scan table file, or a checkpoint (scanned only if ``metric`` or ``also`` — more
    metric columns — is needed)."""
    scope = dict(include_towers=include_towers, allow_unmapped=allow_unmapped)
    if isinstance(source, pd.DataFrame):
        return inputs_from_table(source, **scope)
    path = Path(source)
    if path.is_file() and path.suffix in FORMATS:
        return inputs_from_table(read_scan(path), str(path), **scope)
    wanted = [m for m in (metric, *also) if m is not None]
    if not wanted:
        return inventory(path, **scope)
    from layerscope.spectral.scan import scan  # a model path with a metric to measure

    estimators = tuple(dict.fromkeys(ESTIMATOR_OF.get(m, "alpha") for m in wanted))  # alpha_weighted needs alpha
    return inputs_from_table(scan(path, estimators=estimators, progress=progress), str(path), **scope)
