"""Diagnostics you can look at: ESD and model-level plots, and an HTML report."""

from layerscope.viz.plots import plot_allocations, plot_alphas_by_layer, plot_esd, plot_near_zero, plot_norms_by_layer
from layerscope.viz.report import build_report

__all__ = ["build_report", "plot_allocations", "plot_alphas_by_layer", "plot_esd", "plot_near_zero",
           "plot_norms_by_layer"]
