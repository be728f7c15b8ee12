"""Spectral analysis: Gram eigenvalues, tail estimators, metrics and the scan."""

from layerscope.spectral.estimators import alpha_hill, alpha_peak, alpha_ww
from layerscope.spectral.scan import ScanOptions, layer_summary, scan, scan_checkpoint

__all__ = ["ScanOptions", "alpha_hill", "alpha_peak", "alpha_ww", "layer_summary", "scan", "scan_checkpoint"]
