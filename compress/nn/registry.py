"""The registry of replayable modules: type name -> (spec of a module, module from a spec)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}
_SPECS: dict[type, Callable[[nn.Module], dict]] = {}


def replayable(name: str, to_spec: Callable[[nn.Module], dict], from_spec: Callable[[dict], nn.Module]):
    """Register a module type: ``to_spec(module) -> dict`` and ``from_spec(dict) -> empty module``."""

    def deco(cls):
        _BUILDERS[name] = from_spec
        _SPECS[cls] = lambda m: {"type": name, **to_spec(m)}
        return cls

    return deco


def module_spec(module: nn.Module) -> dict:
    """The JSON spec that rebuilds ``module``'s structure (not its weights)."""
    for cls in type(module).__mro__:
        if cls in _SPECS:
            return _SPECS[cls](module)
    raise TypeError(f"{type(module).__name__} cannot be stored in an artifact (not registered in compress.nn)")


def build_module(spec: dict) -> nn.Module:
    """Inverse of ``module_spec``: an un-initialised module of the recorded structure."""
    try:
        builder = _BUILDERS[spec["type"]]
    except KeyError:
        raise KeyError(f"unknown module type {spec.get('type')!r} in artifact; known: {sorted(_BUILDERS)}") from None
    return builder({k: v for k, v in spec.items() if k != "type"})


replayable(
    "linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    lambda s: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"]),
)(nn.Linear)
