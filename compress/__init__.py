"""dit-compress: make Diffusion Transformers smaller and faster without losing image quality.

Public API::

    import compress
    model = compress.load_model("reference")          # or a .safetensors / .pt / diffusers dir
    adapter = compress.get_adapter(model)              # structural view: blocks, attention, MLP
"""

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.loading import load_model

__all__ = ["DitCompressError", "get_adapter", "load_model"]
__version__ = "0.1.0"
