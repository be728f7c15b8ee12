"""Signals measured on the task's own rows, for the strategies that plan from data.

* ``sensitivity``: Σ|W ⊙ ∂L/∂W| per target matrix (:mod:`layerscope.activations.sensitivity`) on a few
  seeded batches of the training rows, with the task's loss (a classifier's new head is initialised with
  the seed, as in the runs).
* hilo with ``rank_source=activations``: near-zero fractions of every projection's outputs
  (:mod:`layerscope.activations`) with the training rows as the calibration text.

``compare-plans`` measures them once (rank 0 under torchrun), writes them under ``--out`` and plans from
the files, unless ``--option sensitivity.scores=FILE`` / ``--option hilo.activations=FILE`` gives them.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.experiments.arms import PlanSettings
from layerscope.experiments.distributed import World
from layerscope.experiments.runs import _device, _model, collator, examples, load_tokenizer
from layerscope.experiments.task import Task

SENSITIVITY_BATCHES = 8
ACTIVATION_SAMPLES = 64


def measure_sensitivity(model_path: str | Path, task: Task, *, batches: int = SENSITIVITY_BATCHES,
                        batch_size: int = 16, max_length: int = 64, seed: int = 0, device: str = "cpu",
                        progress: bool = True) -> pd.DataFrame:
    """Per target matrix of the task's model: mean over ``batches`` seeded batches of training rows of Σ|W ⊙ ∂L/∂W|."""
    import transformers

    from layerscope.activations.sensitivity import sensitivity
    from layerscope.checkpoint import open_checkpoint

    if batches < 1 or batch_size < 1:
        raise LayerscopeError(f"--batches {batches} / --batch-size {batch_size}: both must be >= 1")
    model_path = str(model_path)
    transformers.set_seed(seed)
    tokenizer = load_tokenizer(model_path)
    model = _model(model_path, task).to(_device(device))
    rows = examples(tokenizer, task, "train", max_length)
    chosen = random.Random(seed).sample(range(len(rows)), min(len(rows), batches * batch_size))
    collate = collator(task, tokenizer)
    batch_list = [collate([rows[i] for i in chosen[start:start + batch_size]])
                  for start in range(0, len(chosen), batch_size)]
    table = sensitivity(model, batch_list, device=_device(device), progress=progress, total=len(batch_list))
    table.attrs.update(path=model_path, fingerprint=open_checkpoint(model_path).fingerprint(), task=task.source,
                       task_kind=task.kind, rows=len(chosen), batch_size=batch_size, max_length=max_length, seed=seed)
    return table


def with_task_signals(model: str, task: Task, items: list[str], plan_settings: PlanSettings, *, out: Path,
                      batch_size: int, max_length: int, device: str, world: World, log) -> PlanSettings:
    """``plan_settings`` with the data tables the named strategies need, measured here when not given."""
    options = {name: dict(values) for name, values in plan_settings.options.items()}
    if "sensitivity" in items and options.get("sensitivity", {}).get("scores") is None:
        path = out / "sensitivity.json"
        if world.is_main:
            from layerscope.tables import write_sensitivity

            log.line(f"sensitivity: Σ|W ⊙ ∂L/∂W| on {SENSITIVITY_BATCHES} batches of the training rows")
            out.mkdir(parents=True, exist_ok=True)
            write_sensitivity(measure_sensitivity(model, task, batch_size=batch_size, max_length=max_length,
                                                  device=device, progress=False), path)
        options.setdefault("sensitivity", {})["scores"] = str(path)
    hilo = options.get("hilo", {})
    if "hilo" in items and hilo.get("rank_source") == "activations" and hilo.get("activations") is None:
        path = out / "activations.parquet"
        if world.is_main:
            _measure_activations(model, task, out, max_length, device, path, log)
        options["hilo"]["activations"] = str(path)
    world.barrier()
    return replace(plan_settings, options=options)


def _measure_activations(model: str, task: Task, out: Path, max_length: int, device: str, path: Path, log) -> None:
    from layerscope.activations import measure
    from layerscope.tables import write_activations

    rows = out / "activations_rows.jsonl"
    texts = [f"{prompt}{text}" for prompt, text in zip(task.train_prompts, task.train_texts)] \
        if task.train_prompts else task.train_texts
    out.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    log.line(f"activations: near-zero fractions on {ACTIVATION_SAMPLES} sequences of the training rows")
    table = measure(model, rows, max_samples=ACTIVATION_SAMPLES, seq_len=max(16, max_length), device=device,
                    progress=False)
    write_activations(table, path)


# Every signal a strategy plans from, with the direction the strategy assumes (+1: more of the signal, more capacity).
SIGNAL_CLAIMS = {
    "alpha": (1, "TempBalance: a higher alpha is a less trained layer"),
    "alpha_hill": (1, "TempBalance's Hill estimator of alpha"),
    "alpha_peak": (1, "AlphaLoRA: experts ∝ alpha_peak^β"),
    "alpha_farms": (1, "FARMS: alpha from subsampled blocks"),
    "stable_rank": (None, "no strategy plans from it; reported for its sign"),
    "sensitivity": (1, "sensitivity / AdaLoRA: a more sensitive layer gets more"),
    "near_zero_fraction": (-1, "HILO: more near-zero outputs, a lower rank tier"),
    "depth": (1, "MoLA ▽ and HILO by depth: deeper layers get more"),
}
SPECTRAL_SIGNALS = ("alpha", "alpha_hill", "alpha_peak", "alpha_farms", "stable_rank")


def group_signals(model: str, task: Task, uniform_plan, groups: list[list[int]], *, out: Path, settings, world: World,
                  log) -> dict:
    """Every planning signal per group of layers: the mean over the group's layers of each layer's mean over its
    planned modules.  Spectral signals from a scan, sensitivity and near-zero fractions from the task's training
    rows (measured once, rank 0, and kept under ``out``)."""
    modules = {m["name"] for m in uniform_plan.modules()}
    path = out / "signals_by_layer.json"
    if world.is_main and not _fresh(path, uniform_plan.model["fingerprint"], modules):
        by_layer = _signals_by_layer(model, task, modules, out, settings, log)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": uniform_plan.model["fingerprint"], "modules": sorted(modules),
                                    "signals": by_layer}, indent=1), encoding="utf-8")
    world.barrier()
    by_layer = json.loads(path.read_text(encoding="utf-8"))["signals"]
    result = {}
    for name, (direction, claim) in SIGNAL_CLAIMS.items():
        if name not in by_layer:
            continue
        values = {int(layer): value for layer, value in by_layer[name].items()}
        result[name] = {"direction": direction, "claim": claim,
                        "per_group": [sum(values[layer] for layer in group) / len(group) for group in groups]}
    return result


def _fresh(path: Path, fingerprint: str, modules: set[str]) -> bool:
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored.get("fingerprint") == fingerprint and set(stored.get("modules", [])) == modules


def _signals_by_layer(model: str, task: Task, modules: set[str], out: Path, settings, log) -> dict[str, dict]:
    from layerscope.spectral import scan

    log.line("signals: a scan (alpha, alpha_hill, alpha_peak, alpha_farms, stable_rank)")
    table = scan(model, estimators=["alpha", "alpha_hill", "alpha_peak", "alpha_farms"], progress=False)
    table = table[table["module"].isin(modules)]
    layers = sorted(int(layer) for layer in table["layer"].dropna().unique())
    by_layer = {name: _layer_means(table, name) for name in SPECTRAL_SIGNALS}
    log.line(f"signals: sensitivity on {SENSITIVITY_BATCHES} batches of the training rows")
    scores = measure_sensitivity(model, task, batch_size=settings.batch_size, max_length=settings.max_length,
                                 device=settings.device, progress=False)
    by_layer["sensitivity"] = _layer_means(scores[_planned(scores["module"], modules)], "sensitivity")
    activations = out / "activations.parquet"
    _measure_activations(model, task, out, settings.max_length, settings.device, activations, log)
    fractions = pd.read_parquet(activations)
    fractions = fractions[(fractions["kind"] == "projection") & _planned(fractions["module"], modules)]
    by_layer["near_zero_fraction"] = _layer_means(fractions, "near_zero_fraction")
    by_layer["depth"] = {str(layer): float(layer) for layer in layers}
    return by_layer


def _planned(names: pd.Series, modules: set[str]) -> pd.Series:
    """The rows of planned modules; a task model names them under its own prefix (``bert.encoder.layer.0…``)."""
    return names.map(lambda name: name in modules or any(name.endswith("." + m) for m in modules))


def _layer_means(table: pd.DataFrame, column: str) -> dict[str, float]:
    means = table.groupby("layer")[column].mean()
    return {str(int(layer)): float(value) for layer, value in means.items()}
