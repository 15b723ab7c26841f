"""Fixtures shared by the process tests."""
from __future__ import annotations

import pytest

from service_harness import Topology


@pytest.fixture
def topo(tmp_path):
    """``topo(overrides=None, base=...)`` -> a new `Topology` under tmp_path; every process it
    started is SIGKILLed (a stopped one too) and its run's files removed at teardown."""
    made = []

    def make(overrides=None, **kw):
        t = Topology(tmp_path / f"t{len(made)}", overrides, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.kill_all()
