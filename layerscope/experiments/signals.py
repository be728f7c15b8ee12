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
