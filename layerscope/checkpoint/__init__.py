"""Checkpoint access: lazy validated safetensors reading and architecture naming."""

from layerscope.checkpoint.naming import NamingScheme, TensorRole, detect_scheme
from layerscope.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "NamingScheme", "TensorInfo", "TensorRole", "detect_scheme", "open_checkpoint"]
