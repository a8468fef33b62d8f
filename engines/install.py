"""The one way an install hint is written. The project is on no package index, so every hint is the
checkout form `pip install -e ".[extra]"`, run from the aptp checkout (`pip install "aptp[extra]"` would
fail, or install an unrelated package of that name)."""

from __future__ import annotations


def install_hint(*extras: str) -> str:
    """'pip install -e ".[gpu]" (from the aptp checkout)' for install_hint("gpu")."""
    return f'pip install -e ".[{",".join(extras)}]" (from the aptp checkout)'
