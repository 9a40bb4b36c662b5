"""Modules that passes put into a model, each rebuildable from a small JSON ``spec``.

An artifact records every sub-module replacement as ``(path, spec)``; loading rebuilds the source
architecture, re-creates each replacement from its spec (with empty tensors of the right shapes)
and then loads the weights strictly. Any class registered here can therefore appear in an artifact.
"""

from compress.nn.registry import build_module, module_spec, replayable
from compress.nn import attention, guidance, moe, quant  # noqa: E402,F401  (registers their modules)

__all__ = ["build_module", "module_spec", "replayable"]
