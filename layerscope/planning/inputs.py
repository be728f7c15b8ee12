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

from layerscope.checkpoint.modeltree import model_facts, tree_for_checkpoint
from layerscope.checkpoint.naming import detect_scheme
from layerscope.checkpoint.quantization import logical_tensors
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.errors import LayerscopeError
from layerscope.tables import FORMATS, read_scan

MODULE_COLUMNS = ["layer", "role", "module", "in_features", "out_features"]
# Numeric scan columns that say where a matrix is, not how it is: never a planning metric.
NOT_METRICS = frozenset({"layer", "stack_layer", "expert", "in_features", "out_features", "N", "M", "num_evals"})


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
    modules: pd.DataFrame  # one row per target module: MODULE_COLUMNS (+ metric columns from a scan)

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
    def shapes_by_layer(self) -> dict[int, list[tuple[str, int, int]]]:
        """layer → [(role, in_features, out_features)] of its target modules."""
        out: dict[int, list[tuple[str, int, int]]] = {}
        for m in self.modules.itertuples(index=False):
            out.setdefault(int(m.layer), []).append((m.role, int(m.in_features), int(m.out_features)))
        return out

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
        if not roles:
            return self
        unknown = sorted(set(roles) - set(self.modules["role"]))
        if unknown:
            raise LayerscopeError(f"--target-roles: {unknown} not in this model (has {sorted(set(self.modules['role']))})")
        return PlanInputs(self.model, self.modules[self.modules["role"].isin(roles)].reset_index(drop=True))


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
    modules["layer"] = modules["layer"].astype(int)
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
    tensors = logical_tensors(ckpt)
    tree, _ = tree_for_checkpoint(ckpt.config, ckpt.path)
    scheme = detect_scheme(ckpt.config, [t.name for t in tensors], tree)
    rows = []
    for info in tensors:
        role = scheme.classify(info.name, info.shape, info.analysable_dtype)
        if role.kind not in ("projection", "other") or len(info.shape) != 2 or role.layer is None:
            continue
        out_f, in_f = (info.shape[1], info.shape[0]) if role.conv1d else info.shape
        rows.append({"kind": role.kind, "stack": role.stack, "layer": role.layer, "role": role.role,
                     "module": role.module, "in_features": in_f, "out_features": out_f})
    table = pd.DataFrame(rows, columns=["kind", "stack", *MODULE_COLUMNS])
    table.attrs.update(path=str(Path(path).resolve()), architecture=ckpt.architecture, model_type=ckpt.config.get("model_type"),
                       num_layers=scheme.num_layers or ckpt.num_layers, fingerprint=ckpt.fingerprint(),
                       **model_facts(scheme, tree, ckpt.config))
    return inputs_from_table(table, str(path), include_towers, allow_unmapped)


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
