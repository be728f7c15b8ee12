"""The run store shared by every experiment that trains plans (``compare-plans``, ``layer-value``).

``out/runs/<arm>__seed<s>__lr<rate>.json`` holds one finished run each, keyed by everything that
determines it (model tensors, the plan as trained, task rows, seed, settings, trainer), so an interrupted
experiment resumes and two experiments with the same ``--out`` share the runs they have in common.
Progress goes to stderr as one timestamped line per event (on a terminal or not: an experiment can
take hours, and a log file should show it).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.experiments import distributed
from layerscope.experiments.arms import Arm
from layerscope.experiments.peft_arms import adalora_schedule
from layerscope.experiments.runs import Settings, train_run
from layerscope.experiments.task import Task
from layerscope.outputs import write_files


class Log:
    """One timestamped line per event on stderr (off with ``progress=False`` / ``--quiet``)."""

    def __init__(self, enabled: bool, world: distributed.World | None = None, name: str = "compare-plans"):
        self.enabled, self.name = enabled, name
        self.prefix = f" rank {world.rank}/{world.size}" if world is not None and world.size > 1 else ""

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.name}{self.prefix} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class RunStore:
    """``folder/<arm>__seed<s>__lr<rate>.json``: one finished run each, reused when its key matches."""

    def __init__(self, folder: Path, model: str, task: Task):
        self.folder, self.model, self.task = folder, model, task

    def path(self, arm: Arm, seed: int, settings: Settings) -> Path:
        return self.folder / f"{safe_name(arm.name)}__seed{seed}__lr{settings.learning_rate:g}.json"

    def find(self, arm: Arm, seed: int, settings: Settings) -> dict | None:
        """The stored run, or None when there is none with this run's key."""
        return stored_run(self.path(arm, seed, settings), arm_key(arm, self.task, seed, settings))

    def load(self, arm: Arm, seed: int, settings: Settings) -> dict:
        """A run that this process or another rank stored (after a barrier)."""
        stored = self.find(arm, seed, settings)
        if stored is None:
            raise LayerscopeError(f"{self.path(arm, seed, settings)}: the run of {arm.name} seed {seed} is missing "
                                  "from the run store (did a rank stop early, or is --out not shared by every rank?)")
        return stored

    def run(self, arm: Arm, seed: int, settings: Settings, log: Log, label: str) -> dict:
        key = arm_key(arm, self.task, seed, settings)
        path = self.path(arm, seed, settings)
        stored = stored_run(path, key)
        if stored is not None:
            log.line(f"{label}: {arm.name} seed {seed} at lr {settings.learning_rate:g}: stored result reused")
            return stored
        log.line(f"{label}: {arm.name} seed {seed} at lr {settings.learning_rate:g}: training {settings.steps} steps")

        def tell(text: str) -> None:
            log.line(f"  {arm.name} seed {seed}: {text}")

        record = {"key": key, "arm": arm.name, **train_run(self.model, arm.plan, self.task, seed, settings, tell,
                                                           trainer=arm.trainer, schedule=schedule_of(arm, settings))}
        record["collapsed"] = collapsed(record, self.task)
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=1)
        write_files({path: lambda tmp, text=text: tmp.write_text(text)}, "--out")
        log.line(f"{label}: {arm.name} seed {seed}: test {record['metric']} {record['final']:.4f} "
                 f"({record['seconds_per_step']:.2f} s/step)")
        return record


def collapsed(record: dict, task: Task) -> bool:
    """A run that learned nothing: test accuracy within two binomial standard errors of always answering the
    majority label, or (causal LM) a final validation loss no lower than before training."""
    if task.kind == "classification":
        chance = task.majority_rate()
        return record["final"] <= chance + 2 * math.sqrt(chance * (1 - chance) / len(task.eval_labels))
    return record["final_validation"] >= record["curve"][0][1]


def run_key(the_plan, task: Task, seed: int, settings: Settings) -> str:
    """Everything that determines a run: model tensors, the whole plan (layers, expert type, LoRA settings,
    roles), task rows, seed, training settings."""
    document = the_plan.document
    parts = {"model": the_plan.model["fingerprint"],
             "plan": digest({"layers": _trained_layers(document["layers"]),
                             **{k: document.get(k) for k in ("expert_type", "lora", "target_roles", "optimizer")}}),
             "task": digest([task.kind, *(task.split(name) for name in ("train", "validation", "test"))]),
             "seed": seed, "settings": asdict(settings)}
    return digest(parts)


def _trained_layers(layers: list[dict]) -> list[dict]:
    """The plan's layers as trained.  A layer's ``metric`` says why it got its experts but does not enter training,
    and a scan on another machine reproduces it only to the last few digits (other BLAS kernels): keyed on it, a
    comparison resumed elsewhere would train its strategy arms again."""
    return [{field: value for field, value in layer.items() if field != "metric"} for layer in layers]


def arm_key(arm: Arm, task: Task, seed: int, settings: Settings) -> str:
    """:func:`run_key`, plus the trainer (and AdaLoRA's schedule) for arms not trained by layerscope.runtime."""
    key = run_key(arm.plan, task, seed, settings)
    if arm.trainer == "layerscope":
        return key
    return digest({"run": key, "trainer": arm.trainer, "schedule": schedule_of(arm, settings)})


def schedule_of(arm: Arm, settings: Settings) -> dict | None:
    if arm.trainer != "adalora":
        return None
    return adalora_schedule(arm.plan.layers[0]["rank"], settings.steps).as_dict()


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_run(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: run it again
    return record if record.get("key") == key else None


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
