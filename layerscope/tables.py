"""Reading and writing result tables (.parquet, .csv, .json), atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.outputs import settle, write_files

FORMATS = (".parquet", ".csv", ".json")
SCAN_SCHEMA = "layerscope.scan/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    write_files({Path(path): write})


def layers_path(path: Path) -> Path:
    """Where the per-layer table goes next to a .csv/.parquet per-matrix table."""
    return path.with_name(f"{path.stem}.layers{path.suffix}")


def model_path(path: Path) -> Path:
    """Sidecar holding the model facts (``df.attrs``) next to a .csv table, which cannot store them."""
    return path.with_name(f"{path.stem}.model.json")


def output_format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise LayerscopeError(f"--out {path}: unknown format {path.suffix!r} (use {', '.join(FORMATS)})")
    return path.suffix


def scan_outputs(path: str | Path) -> list[Path]:
    """Every file ``write_scan`` writes for ``--out path``."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == ".json":
        return [path]
    return [path, layers_path(path)] + ([model_path(path)] if fmt == ".csv" else [])


# df.attrs about one run rather than the model (cache reuse): shown by the CLI, never written.
RUN_ATTRS = ("cache", "ranks")


def _without_run_attrs(table: pd.DataFrame) -> pd.DataFrame:
    if not any(key in table.attrs for key in RUN_ATTRS):
        return table
    table = table.copy()
    table.attrs = {k: v for k, v in table.attrs.items() if k not in RUN_ATTRS}
    return table


def write_scan(matrices: pd.DataFrame, layers: pd.DataFrame, path: str | Path, schema: str = SCAN_SCHEMA
               ) -> list[Path]:
    """Write the per-matrix and per-layer tables (and the .csv model sidecar) as one set; return them."""
    path = Path(path)
    fmt = output_format(path)
    matrices, layers = _without_run_attrs(matrices), _without_run_attrs(layers)
    if fmt == ".json":
        document = {"schema": schema, "model": jsonable(matrices.attrs),
                    "matrices": _records(matrices), "layers": _records(layers)}
        return write_files({path: lambda tmp: tmp.write_text(json.dumps(document, indent=1, allow_nan=False))})
    if fmt == ".csv":
        sidecar = json.dumps(jsonable(matrices.attrs), indent=1, allow_nan=False)
        return write_files({path: lambda tmp: matrices.to_csv(tmp, index=False),
                            layers_path(path): lambda tmp: layers.to_csv(tmp, index=False),
                            model_path(path): lambda tmp: tmp.write_text(sidecar)})
    return write_files({path: lambda tmp: matrices.to_parquet(tmp, index=False),
                        layers_path(path): lambda tmp: layers.to_parquet(tmp, index=False)})


def read_scan(path: str | Path, schema: str = SCAN_SCHEMA) -> pd.DataFrame:
    """Read a per-matrix table written by :func:`write_scan` (``schema``: what a .json must declare)."""
    path = Path(path)
    fmt = output_format(path)
    settle(scan_outputs(path))
    if not path.is_file():
        raise LayerscopeError(f"{path}: no such file")
    try:
        if fmt == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(document, dict) or document.get("schema") != schema:
                raise LayerscopeError(f"{path}: field 'schema' is not {schema!r}")
            table = pd.DataFrame(document["matrices"])
            table.attrs.update(document.get("model", {}))
            return integer_columns(table)
        if fmt == ".parquet":
            return integer_columns(pd.read_parquet(path))
        table = pd.read_csv(path)
        if model_path(path).is_file():
            table.attrs.update(json.loads(model_path(path).read_text(encoding="utf-8")))
        return integer_columns(table)
    except LayerscopeError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a corrupt file
        raise LayerscopeError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from None


# Index-like columns: whole numbers or missing (pandas' nullable Int64), never 1.0 in a CSV or 0.000 in a print.
INTEGER_COLUMNS = ("layer", "stack_layer", "expert", "matrix_rank", "rank_loss", "weak_rank_loss", "rf")


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    for column in INTEGER_COLUMNS:
        if column in table.columns and not pd.api.types.is_integer_dtype(table[column]):
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


def _records(table: pd.DataFrame) -> list[dict]:
    return [{k: jsonable(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def jsonable(value):
    """Plain JSON values: numpy/torch scalars unwrapped, paths as strings, NaN/Inf as null."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_activations(table: pd.DataFrame, path: str | Path) -> Path:
    """Write an activations table (.parquet keeps the histogram lists; .csv stores them as JSON)."""
    return _write_module_table(table, path, "layerscope.activations/1",
                               table.assign(hist_log10=table["hist_log10"].map(json.dumps)))


def _write_module_table(table: pd.DataFrame, path: str | Path, schema: str, flat: pd.DataFrame | None = None) -> Path:
    """A per-module table as JSON (schema, settings from attrs, rows), CSV (``flat``: lists as JSON text) or
    Parquet, by the path's suffix."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == ".json":
        document = {"schema": schema, "settings": jsonable(table.attrs), "modules": _records(table)}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=1, allow_nan=False)))
    elif fmt == ".csv":
        atomic_write(path, lambda tmp: (table if flat is None else flat).to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    return path


def read_activations(path: str | Path) -> pd.DataFrame:
    """Read an activations table written by :func:`write_activations`."""
    path = Path(path)
    fmt = output_format(path)
    if not path.is_file():
        raise LayerscopeError(f"{path}: no such file")
    try:
        if fmt == ".parquet":
            table = pd.read_parquet(path)
        elif fmt == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            table = pd.DataFrame(document["modules"])
            table.attrs.update(document.get("settings", {}))
        else:
            table = pd.read_csv(path)
            table["hist_log10"] = table["hist_log10"].map(json.loads)
    except Exception as exc:
        raise LayerscopeError(f"{path}: cannot read activations table ({type(exc).__name__}: {exc})") from None
    for column in ("layer", "kind", "role", "near_zero_fraction"):
        if column not in table.columns:
            raise LayerscopeError(f"{path}: column {column!r} is missing (not a layerscope activations table?)")
    return table


SENSITIVITY_SCHEMA = "layerscope.sensitivity/1"
SENSITIVITY_COLUMNS = ("layer", "module", "role", "sensitivity")


def write_sensitivity(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a sensitivity table (``layerscope sensitivity``); .json and .parquet keep how it was measured."""
    return _write_module_table(table, path, SENSITIVITY_SCHEMA)


def read_sensitivity(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_sensitivity` (a CSV carries no fingerprint: it is not checked)."""
    path = Path(path)
    fmt = output_format(path)
    if not path.is_file():
        raise LayerscopeError(f"{path}: no such file")
    try:
        if fmt == ".parquet":
            table = pd.read_parquet(path)
        elif fmt == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("schema") != SENSITIVITY_SCHEMA:
                raise LayerscopeError(f"{path}: schema {document.get('schema')!r}, expected {SENSITIVITY_SCHEMA} "
                                      "(write it with `layerscope sensitivity`)")
            table = pd.DataFrame(document["modules"])
            table.attrs.update(document.get("settings", {}))
        else:
            table = pd.read_csv(path)
    except LayerscopeError:
        raise
    except Exception as exc:
        raise LayerscopeError(f"{path}: cannot read sensitivity table ({type(exc).__name__}: {exc})") from None
    for column in SENSITIVITY_COLUMNS:
        if column not in table.columns:
            raise LayerscopeError(f"{path}: column {column!r} is missing (not a layerscope sensitivity table?)")
    return table
