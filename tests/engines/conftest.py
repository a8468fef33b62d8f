"""Until the shared tests/conftest.py exists: make tests/ importable (engines_export_fixture, ...)."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
