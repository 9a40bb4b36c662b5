"""Passes, one file each, registered by name in ``PASSES``."""

from compress.calibration import CalibrationConfig, CalibrationSet, CalibrationSource
from compress.passes.base import PASSES, LayerSelection, PassConfig, PassContext, PassSpec, register_pass
from compress.passes import cache, distill, moe, prune_depth, prune_width, quantize  # noqa: F401  (registers)

__all__ = ["PASSES", "CalibrationConfig", "CalibrationSet", "CalibrationSource", "LayerSelection", "PassConfig",
           "PassContext", "PassSpec", "register_pass"]
