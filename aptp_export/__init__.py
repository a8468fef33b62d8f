"""APTP model surgery and export: architecture space, unit kinds, gating, MACs, physical pruning, ONNX/TensorRT.

    from aptp_export import ArchSpace, save_expert, load_expert
"""

from engines.errors import UserError

from .arch_space import ArchSpace
from .expert_io import load_expert, save_expert

__all__ = ["ArchSpace", "UserError", "load_expert", "save_expert"]
