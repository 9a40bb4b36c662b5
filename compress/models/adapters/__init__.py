"""One adapter per model family; ``get_adapter(model)`` picks the right one."""

from compress.models.adapters.base import (
    ADAPTERS, AttentionView, BlockView, Cond, MLPView, ModelAdapter, adapter_for_architecture, get_adapter,
    register_adapter,
)
from compress.models.adapters import native  # noqa: F401  (registers)
from compress.models.adapters import diffusers_families  # noqa: F401  (registers)

__all__ = ["ADAPTERS", "AttentionView", "BlockView", "Cond", "MLPView", "ModelAdapter", "adapter_for_architecture",
           "get_adapter", "register_adapter"]
