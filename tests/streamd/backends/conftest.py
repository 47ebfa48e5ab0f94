"""The fake_gpu fixture: fake tensorrt and torch modules (tests/streamd/backends/fake_gpu.py)."""

from __future__ import annotations

import sys

import pytest

from tests.streamd.backends.fake_gpu import FAKE_CALLS, FakeTRT, fake_torch


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT)
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    FakeTRT.builds.clear()
    FAKE_CALLS.clear()
    return FakeTRT
