"""Experiments that train plans: equal-budget comparisons of allocation strategies on a user's task."""

from layerscope.experiments.compare import SCHEMA, compare_plans, resolve_plans, results_table
from layerscope.experiments.runs import Settings
from layerscope.experiments.task import Task, load_task

__all__ = ["SCHEMA", "Settings", "Task", "compare_plans", "load_task", "resolve_plans", "results_table"]
