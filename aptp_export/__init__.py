"""APTP model surgery and export: architecture space, gating, MACs, physical pruning, ONNX/TensorRT export.

Public names are imported lazily so that `aptp --help` and light tools do not pay for importing torch.
"""

from importlib import import_module

from engines.errors import UserError

_LAZY = {
    "ArchSpace": ".arch_space",
    "save_expert": ".expert_io",
    "load_expert": ".expert_io",
}

__all__ = ["UserError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
