"""dit-compress: make Diffusion Transformers smaller and faster without losing image quality.

Public API::

    import compress
    model = compress.load_model("reference")           # or .safetensors / .pt / diffusers dir / artifact dir
    small = compress.apply_recipe(model, "recipes/int8-weights.yaml")
    compress.save(small, "out/int8")                    # model.safetensors + manifest.json, atomically
    again = compress.load("out/int8")                   # bit-identical outputs
"""

from compress.artifact import load, save
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.sources import load_model
from compress.recipe import apply_recipe, load_recipe

__all__ = ["DitCompressError", "apply_recipe", "get_adapter", "load", "load_model", "load_recipe", "save"]
__version__ = "0.1.0"
