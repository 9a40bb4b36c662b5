"""Passes, one file each, registered by name in ``PASSES``."""

from compress.calibration import CalibrationConfig, CalibrationSet, CalibrationSource
from compress.passes.base import PASSES, LayerSelection, PassConfig, PassContext, PassSpec, register_pass
from compress.passes import (  # noqa: F401  (registers)
    cache, distill, linear_attention, moe, prune_depth, prune_width, quantize)

__all__ = ["PASSES", "CalibrationConfig", "CalibrationSet", "CalibrationSource", "LayerSelection", "PassConfig",
           "PassContext", "PassSpec", "register_pass"]
