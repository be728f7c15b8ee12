"""Allocation planning: strategies, budgets, parameter accounting and the plan document."""

from layerscope.planning.api import plan
from layerscope.planning.plan import LoraSettings, Plan, recount
from layerscope.planning.registry import STRATEGIES

__all__ = ["STRATEGIES", "LoraSettings", "Plan", "plan", "recount"]
