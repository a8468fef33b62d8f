"""Shared test set-up. Tests mirror the packages (tests/engines, tests/aptp_export, tests/training,
tests/benchmarks, tests/cli); helpers that build tiny models and exports live beside this file
(arch_testkit.py, prune_fixtures.py, engines_export_fixture.py) and are importable from every folder,
because pytest puts this file's directory on sys.path.

Fixtures:
- `pixel`: the tiny pixel-space export of engines_export_fixture (built once per session).
- `one_thread`: torch on one intra-op thread for the test (tiny models run faster so, above all on a
  busy 2-core machine). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
"""

from __future__ import annotations

import pytest
import torch
from engines_export_fixture import build_export


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pixel():
    return build_export("pixel")
