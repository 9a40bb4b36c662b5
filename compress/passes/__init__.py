"""Passes, one file each, registered by name in ``PASSES``."""

from compress.passes.base import PASSES, LayerSelection, PassConfig, PassSpec, register_pass
from compress.passes.context import CalibrationConfig, CalibrationSet, PassContext
from compress.passes import distill, prune_depth, prune_width, quantize  # noqa: F401  (registers)

__all__ = ["PASSES", "CalibrationConfig", "CalibrationSet", "LayerSelection", "PassConfig", "PassContext",
           "PassSpec", "register_pass"]
