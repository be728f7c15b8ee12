"""Experiments that train plans: like-for-like comparisons of allocation strategies on a user's task."""

from pathlib import Path

from layerscope.experiments.arms import Arm, PlanSettings, build_arms, like_for_like
from layerscope.experiments.compare import SCHEMA, compare_plans, planned_runs, results_table
from layerscope.experiments.runs import Settings
from layerscope.experiments.task import Task, load_task


def prepare_model(model: str | Path, out: str | Path) -> Path:
    """The model as a folder: a .gguf file is converted once to ``out/model`` (see layerscope.checkpoint.gguf)."""
    model = Path(model)
    if model.suffix == ".gguf":
        from layerscope.checkpoint.gguf import materialize_gguf

        return materialize_gguf(model, Path(out) / "model")
    return model


__all__ = ["SCHEMA", "Arm", "PlanSettings", "Settings", "Task", "build_arms", "compare_plans", "like_for_like",
           "load_task", "planned_runs", "prepare_model", "results_table"]
