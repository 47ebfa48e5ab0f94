"""Fixtures for the GPU backends' own code without a GPU (tests/streamd/backends/fake_gpu.py).

recording_cuda: cuda_slots.CudaRuntime replaced by the recording CPU runtime, for both backends.
fake_gpu: that, plus a fake tensorrt module, and torch.cuda answering as one "Fake GPU 80GB" would (for
tensorrt_build's checks; nothing runs on it).
"""

from __future__ import annotations

import sys

import pytest

from tests.streamd.backends import fake_gpu as fakes


@pytest.fixture
def recording_cuda(monkeypatch):
    from streamd.backends import cuda_slots

    monkeypatch.setattr(cuda_slots, "CudaRuntime", fakes.RecordingRuntime)
    fakes.clear()
    yield fakes.CALLS
    fakes.clear()


@pytest.fixture
def fake_gpu(monkeypatch, recording_cuda):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fakes.FakeTRT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: fakes.RecordingRuntime.gpu_name)
    fakes.FakeTRT.builds.clear()
    return fakes.FakeTRT
