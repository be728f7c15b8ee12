"""Activation profiling: near-zero fractions of layer outputs on a calibration set."""

from layerscope.activations.calibration import read_documents
from layerscope.activations.hf import load_model, measure
from layerscope.activations.profile import layer_fractions, profile

__all__ = ["layer_fractions", "load_model", "measure", "profile", "read_documents"]
