"""APTP model surgery and export: architecture space, unit kinds, gating, MACs, physical pruning, ONNX/TensorRT.

    from aptp_export import ArchSpace, save_expert, load_expert

The names are loaded on first use, so that importing a light submodule (export_options, quantize) does not
import torch (`aptp export --help` stays fast).
"""

from importlib import import_module

from engines.errors import UserError

_LAZY = {"ArchSpace": ".arch_space", "load_expert": ".expert_io", "save_expert": ".expert_io"}

__all__ = ["ArchSpace", "UserError", "load_expert", "save_expert"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
