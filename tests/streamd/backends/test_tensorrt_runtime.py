"""streamd.backends.tensorrt's runtime against fake_gpu.py (a fake tensorrt, the recording CUDA runtime): the order
of work on the streams, the device guard in the calling thread, detections from pictures, engines that do not
deserialize, and close() after a failed submit. The real TensorRT is checked by the gpu tests in test_backends.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from streamd.backends import cuda_slots
from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.backends.select import make_backend
from streamd.config import TensorRTConfig
from streamd.errors import BackendError
from streamd.model.postprocess import postprocess
from streamd.model.preprocess import letterbox_batch
from streamd.types import BGR24

from tests.streamd.backends import fake_gpu
from tests.streamd.backends.fake_gpu import CALLS, GUARDS, FakeTRT

CONF, IOU = 0.3, 0.45


def engine(slot: int, *copies: str) -> list:
    """The compute stream's part of one batch on `slot`."""
    return [("compute", "wait uploaded", slot), ("compute", "execute", None), *[("compute", c, slot) for c in copies],
            ("compute", "record done", slot)]  # fmt: skip


@pytest.fixture
def backend_of(tiny_bundle, tmp_path, fake_gpu):
    made = []

    def make(device: int = 0, max_batch: int = 4):
        made.append(make_backend(tiny_bundle, TensorRTConfig(type="tensorrt", device=device, engine_cache_dir=tmp_path), max_batch))
        CALLS.clear()
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def test_batches_upload_then_execute_and_a_reused_slot_waits_for_its_batch(backend_of, tiny_bundle):
    backend = backend_of()
    batches = [np.full((n, 3, 64, 64), v, np.float32) for n, v in ((4, 255.0), (1, 0.0), (3, 127.5))]
    pending = [backend.submit_tensor(batch) for batch in batches]
    upload = [("upload", "h2d", 0), ("upload", "record uploaded", 0)]
    assert CALLS == (upload + engine(0, "d2h") + [("upload", "h2d", 1), ("upload", "record uploaded", 1)] + engine(1, "d2h")
                     + [("host", "wait done", 0)] + upload + engine(0, "d2h"))  # fmt: skip
    reference = OnnxRuntimeBackend(tiny_bundle, max_batch=4)
    for handle, batch in zip(pending, batches):
        np.testing.assert_allclose(handle.wait(), reference.submit_tensor(batch).wait(), rtol=1e-6)


def test_frames_give_onnxruntimes_detections_in_source_pixels(backend_of, tiny_bundle, monkeypatch):
    backend = backend_of()
    assert backend.pixel_formats == {"bgr24", "yuv420p"}
    monkeypatch.setattr(cuda_slots, "letterbox_frames", fake_gpu.recorded(cuda_slots.letterbox_frames, "letterbox"))
    # uniform frames letterbox exactly alike on the device and with OpenCV; the second is its source at half size
    images = [np.full((48, 64, 3), 255, np.uint8), np.full((64, 32, 3), 200, np.uint8)]
    source_hw = [(48, 64), (128, 64)]
    detections = backend.submit(fake_gpu.frame_batch(images, [BGR24] * 2, [1.0, 0.5], source_hw, CONF, IOU)).wait().detections
    assert CALLS == [("upload", "h2d", 0), ("upload", "letterbox", None), ("upload", "record uploaded", 0)] + engine(0) + [
        ("host", "wait done", 0)]  # fmt: skip
    tensor, scales = letterbox_batch(images, tiny_bundle.meta.input_hw, tiny_bundle.meta.preprocess)
    output = OnnxRuntimeBackend(tiny_bundle, max_batch=4).submit_tensor(tensor).wait()
    expected = postprocess(output, scales * np.array([1.0, 0.5], np.float32), source_hw, CONF, IOU)
    assert sum(len(d) for d in expected) >= 2
    for ours, theirs in zip(detections, expected):
        np.testing.assert_allclose(ours.xyxy, theirs.xyxy, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(ours.confidence, theirs.confidence, rtol=1e-5)
        assert ours.class_id.tolist() == theirs.class_id.tolist()


def test_submit_and_wait_from_another_thread_run_under_the_backends_device(backend_of):
    backend = backend_of(device=1)
    GUARDS.clear()
    results = {}

    def inference() -> None:  # the daemon submits from its inference thread, not the one that built the backend
        frames = [np.zeros((64, 64, 3), np.uint8)]
        results["detections"] = backend.submit(fake_gpu.frame_batch(frames, [BGR24], [1.0], [(64, 64)], CONF, IOU)).wait()
        results["output"] = backend.submit_tensor(np.zeros((2, 3, 64, 64), np.float32)).wait()

    thread = threading.Thread(target=inference, name="inference")
    thread.start()
    thread.join(timeout=60)
    assert "output" in results  # execute_async_v3 and every stream call checked it ran under a guard of its thread
    assert GUARDS and set(GUARDS) == {("inference", "cuda:1")}


def test_close_after_a_failed_execute_waits_for_both_streams(backend_of):
    backend = backend_of(max_batch=2)
    backend.context.execute_async_v3 = lambda stream: False  # the engine refuses the batch after the upload
    with pytest.raises(BackendError, match="execute_async_v3 failed on cuda:0 for a batch of 2"):
        backend.submit_tensor(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(BackendError, match="backend tensorrt: batch of 3 frames, it takes 1..2"):
        backend.submit_tensor(np.zeros((3, 3, 64, 64), np.float32))
    CALLS.clear()
    backend.close()
    assert CALLS == [("host", "synchronize upload", None), ("host", "synchronize compute", None)]


def test_a_cached_engine_that_does_not_deserialize_is_rebuilt(tiny_bundle, tmp_path, fake_gpu, monkeypatch, caplog):
    config = TensorRTConfig(type="tensorrt", engine_cache_dir=tmp_path)
    make_backend(tiny_bundle, config, 2).close()
    assert len(fake_gpu.builds) == 1
    real = FakeTRT.Runtime.deserialize_cuda_engine
    calls = []

    def none_first(runtime, data):  # the cached file (from another TensorRT build, or truncated) does not load
        calls.append(data)
        return None if len(calls) == 1 else real(runtime, data)

    monkeypatch.setattr(FakeTRT.Runtime, "deserialize_cuda_engine", none_first)
    backend = make_backend(tiny_bundle, config, 2)
    assert len(fake_gpu.builds) == 2 and len(calls) == 2 and "does not deserialize; rebuilding it" in caplog.text
    assert backend.submit_tensor(np.full((1, 3, 64, 64), 255.0, np.float32)).wait()[0, 0, 4] == pytest.approx(1.0)
    backend.close()


def test_a_fresh_engine_that_does_not_deserialize_is_a_backend_error(tiny_bundle, tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(FakeTRT.Runtime, "deserialize_cuda_engine", lambda runtime, data: None)
    with pytest.raises(BackendError, match="the engine TensorRT just built does not deserialize"):
        make_backend(tiny_bundle, TensorRTConfig(type="tensorrt", engine_cache_dir=tmp_path), 2)
    assert len(fake_gpu.builds) == 1


def _tensorrt_on_a_gpu() -> str | None:
    """None when the real TensorRT can run here, else why not."""
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_on_a_gpu() is not None, reason=_tensorrt_on_a_gpu() or "")
def test_tensorrt_frames_on_a_gpu_give_onnxruntimes_detections(tiny_bundle, tmp_path):
    backend = make_backend(tiny_bundle, TensorRTConfig(type="tensorrt", precision="fp32", engine_cache_dir=tmp_path), 4)
    images = [np.full((48, 64, 3), 255, np.uint8), np.full((64, 32, 3), 200, np.uint8)]
    source_hw = [(48, 64), (128, 64)]
    try:
        handles = [backend.submit(fake_gpu.frame_batch(images, [BGR24] * 2, [1.0, 0.5], source_hw, CONF, IOU)) for _ in range(3)]
        tensor, scales = letterbox_batch(images, tiny_bundle.meta.input_hw, tiny_bundle.meta.preprocess)
        output = OnnxRuntimeBackend(tiny_bundle, max_batch=4).submit_tensor(tensor).wait()
        expected = postprocess(output, scales * np.array([1.0, 0.5], np.float32), source_hw, CONF, IOU)
        for handle in handles:  # three over two slots: the first is collected when its slot is reused
            for ours, theirs in zip(handle.wait().detections, expected):
                np.testing.assert_allclose(ours.xyxy, theirs.xyxy, rtol=1e-4, atol=1e-2)
                np.testing.assert_allclose(ours.confidence, theirs.confidence, rtol=1e-4, atol=1e-4)
    finally:
        backend.close()
