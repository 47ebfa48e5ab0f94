"""streamd.backends: make_backend's one match, ONNX Runtime on the CPU, TensorRT on a GPU (marked gpu)."""

from __future__ import annotations

import importlib.util
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from streamd.backends import base as base_module
from streamd.backends import select as backends_module
from streamd.backends.base import FrameBatch
from streamd.backends.select import make_backend, tensorrt_usable
from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.backends.tensorrt_build import build_engine, engine_key, engine_path
from streamd.config import AutoBackendConfig, OnnxRuntimeConfig, TensorRTConfig
from streamd.errors import BackendError

from tests.streamd.backends.fake_gpu import FakeTRT
from tests.streamd.backends.fake_trt_build import FakeCalibrator

REPO = Path(__file__).parents[3]
ORT = OnnxRuntimeConfig(type="onnxruntime", threads=1)


def _tensorrt_and_gpu() -> str | None:
    """None when TensorRT can run here, else the skip reason (checked without importing torch needlessly)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


GPU_SKIP = _tensorrt_and_gpu()


def images(count: int, value: float = 0.0) -> np.ndarray:
    return np.full((count, 3, 64, 64), value, np.float32)


@pytest.mark.parametrize("count", [1, 3])
def test_onnxruntime_runs_the_bundle(tiny_bundle, count):
    backend = make_backend(tiny_bundle, ORT, max_batch=4)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.max_batch == 4
    output = backend.submit_tensor(images(count, 255.0)).wait()
    assert output.shape == (count, 84, 8) and output.dtype == np.float32  # 84: a YOLOX head at 64x64
    np.testing.assert_allclose(output[:, 0, 4], 1.0, rtol=1e-6)  # objectness = mean / 255
    np.testing.assert_allclose(output[:, 1, :5], [[44, 40, 20, 24, 0.9]] * count, rtol=1e-6)
    backend.close()


def test_a_host_backend_runs_its_model_in_submit_and_its_nms_in_wait_in_the_waiting_thread(tiny_bundle, monkeypatch):
    """The results thread, not the submitting one, decodes + NMSes, so that the model on the next batch (in submit)
    overlaps the NMS of this one. Moving the decode into submit fails this test."""
    ran: list[tuple[str, str]] = []
    backend = OnnxRuntimeBackend(tiny_bundle, max_batch=2)
    run = backend.run
    monkeypatch.setattr(backend, "run", lambda tensor: ran.append(("model", threading.current_thread().name)) or run(tensor))
    decode = base_module.decode_output
    monkeypatch.setattr(base_module, "decode_output",
                        lambda *args: ran.append(("nms", threading.current_thread().name)) or decode(*args))  # fmt: skip
    handed: queue.Queue = queue.Queue()
    found: list = []
    results = threading.Thread(target=lambda: found.append(handed.get(timeout=30).wait()), name="results")
    results.start()
    pending = backend.submit(FrameBatch.of([np.full((48, 64, 3), 255, np.uint8)], 0.3, 0.45))
    assert ran == [("model", "MainThread")]  # the model ran in submit; nothing decoded yet
    handed.put(pending)
    results.join(timeout=30)
    assert ran == [("model", "MainThread"), ("nms", "results")] and len(found[0].detections[0]) == 2


def test_auto_takes_onnxruntime_when_tensorrt_is_not_usable(tiny_bundle, monkeypatch):
    monkeypatch.setattr(backends_module, "tensorrt_usable", lambda: (False, "tensorrt is not installed"))
    assert make_backend(tiny_bundle, AutoBackendConfig(type="auto")).name == "onnxruntime"


def test_auto_falls_back_to_onnxruntime_when_tensorrt_fails(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setattr(backends_module, "tensorrt_usable", lambda: (True, "pretend"))
    import streamd.backends.tensorrt as trt_module

    def broken(*_args, **_kwargs):
        raise BackendError("engine build failed")

    monkeypatch.setattr(trt_module, "TensorRTBackend", broken)
    assert make_backend(tiny_bundle, AutoBackendConfig(type="auto")).name == "onnxruntime"
    assert "engine build failed" in caplog.text


def test_tensorrt_usable_says_why_not():
    usable, why = tensorrt_usable()
    assert isinstance(usable, bool) and why


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_tensorrt_is_a_clear_backend_error(tiny_bundle):
    with pytest.raises(BackendError, match="tensorrt Python package is not installed"):
        make_backend(tiny_bundle, TensorRTConfig(type="tensorrt"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_is_a_clear_backend_error(tiny_bundle):
    with pytest.raises(BackendError, match="tensorrt Python package is not installed"):
        build_engine(tiny_bundle, precision="fp16", max_batch=8, calibrator=None)


def test_engine_path_defaults_to_the_bundles_engines_folder(tiny_bundle, tmp_path):
    default = engine_path(tiny_bundle, "NVIDIA L4", "10.3.0", "fp16", 8)
    assert default.parent == tiny_bundle.path / "engines" and default.suffix == ".engine"
    assert engine_path(tiny_bundle, "NVIDIA L4", "10.3.0", "fp16", 8, tmp_path).parent == tmp_path


def test_engine_key_names_every_part_of_the_cache_key():
    base = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100 80GB HBM3", trt_version="10.3.0", precision="fp16", max_batch=8)
    key = engine_key(**base)
    assert key.startswith("aaaaaaaaaaaa-nvidia-h100-80gb-hbm3-trt10.3.0-fp16-b8-")
    assert "/" not in key and " " not in key
    assert engine_key(**base) == key  # stable
    for field, other in [("onnx_sha256", "b" * 64), ("gpu_name", "NVIDIA L4"), ("trt_version", "10.4.0"),
                         ("precision", "fp32"), ("max_batch", 4)]:  # fmt: skip
        assert engine_key(**{**base, field: other}) != key, field


def test_streamd_never_imports_torch_outside_its_gpu_backends(tiny_bundle, tmp_path):
    """Loading everything the daemon loads, and running a batch on the CPU, leaves torch unimported."""
    code = f"""
import sys, time
import numpy as np
import streamd.cli, streamd.pipeline.daemon, streamd.pipeline.compose, streamd.backends.select, streamd.backends.tensorrt
from streamd.backends.select import make_backend
from streamd.config import AutoBackendConfig
from streamd.model import load_bundle
from streamd.detector import Detector
bundle = load_bundle({str(tiny_bundle.path)!r})
detector = Detector.for_bundle(bundle, make_backend(bundle, AutoBackendConfig(type="auto"), 2))
detector.warm_up()
detector.detect([np.zeros((48, 64, 3), np.uint8)], 0.3, 0.45)
assert "torch" not in sys.modules, "streamd imported torch"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --- TensorRT on a GPU ---------------------------------------------------------------------------


@pytest.fixture
def trt_config(tmp_path: Path):
    def make(precision: str = "fp32") -> TensorRTConfig:
        return TensorRTConfig(type="tensorrt", precision=precision, engine_cache_dir=tmp_path / "engines", workspace_mb=256)

    return make


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 0.05)])
@pytest.mark.parametrize("count", [1, 3, 4])
def test_tensorrt_matches_onnxruntime(tiny_bundle, trt_config, precision, atol, count):
    batch = np.random.default_rng(count).uniform(0, 255, (count, 3, 64, 64)).astype(np.float32)
    expected = make_backend(tiny_bundle, ORT, 4).submit_tensor(batch).wait()
    backend = make_backend(tiny_bundle, trt_config(precision), max_batch=4)
    np.testing.assert_allclose(backend.submit_tensor(batch).wait(), expected, atol=atol, rtol=1e-3)
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_tensorrt_engine_is_cached_under_its_key_and_reused(tiny_bundle, trt_config, caplog):
    first = make_backend(tiny_bundle, trt_config(), max_batch=2)
    engine_path = first.engine_path
    assert engine_path.is_file() and engine_path.with_suffix(".json").is_file()
    assert "-fp32-b2-" in engine_path.name and engine_path.name.startswith(tiny_bundle.sha256[:12])
    first.close()
    caplog.clear()
    caplog.set_level("INFO")
    second = make_backend(tiny_bundle, trt_config(), max_batch=2)
    assert second.engine_path == engine_path and "loaded TensorRT engine" in caplog.text
    second.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_an_engine_built_ahead_of_time_is_loaded_by_the_daemon(tiny_bundle, trt_config, caplog):
    config = trt_config("fp16")
    built = build_engine(tiny_bundle, precision="fp16", max_batch=4, engine_cache_dir=config.engine_cache_dir, workspace_mb=256)
    assert built.is_file()
    caplog.set_level("INFO")
    backend = make_backend(tiny_bundle, config, max_batch=4)
    assert backend.engine_path == built and "loaded TensorRT engine" in caplog.text
    assert build_engine(tiny_bundle, precision="fp16", max_batch=4, engine_cache_dir=config.engine_cache_dir) == built
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_tensorrt_two_batches_in_flight_overlap_and_stay_correct(tiny_bundle, trt_config):
    backend = make_backend(tiny_bundle, trt_config(), max_batch=4)
    a, b, c = images(4, 255.0), images(2, 0.0), images(3, 127.5)
    pending_a = backend.submit_tensor(a)
    pending_b = backend.submit_tensor(b)  # copies in while a computes
    pending_c = backend.submit_tensor(c)  # reuses a's slot: a's output must survive
    assert pending_a.wait()[:, 0, 4] == pytest.approx(1.0)
    assert pending_b.wait()[:, 0, 4] == pytest.approx(0.0)
    assert pending_c.wait()[:, 0, 4] == pytest.approx(0.5, abs=1e-3)
    assert pending_a.wait().shape == (4, 2, 8) and pending_b.wait().shape == (2, 2, 8)
    with pytest.raises(BackendError, match="1..4"):
        backend.submit_tensor(images(5))
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_tensorrt_int8_without_qdq_nodes_is_refused(tiny_bundle, trt_config):
    with pytest.raises(BackendError, match="trainer build-engine"):
        make_backend(tiny_bundle, trt_config("int8"))


# --- The TensorRT backend's build and cache, against a fake tensorrt (fake_gpu.py; its runtime: test_tensorrt_runtime.py) ---


@pytest.mark.parametrize("version, supported", [("10.0.1", True), ("10.13.3", True), ("11.0.0", False), ("9.2.0", False), ("x.1", False)])
def test_fake_gpu_accepts_exactly_the_supported_tensorrt_majors(tiny_bundle, tmp_path, fake_gpu, monkeypatch, version, supported):
    monkeypatch.setattr(FakeTRT, "__version__", version)
    config = TensorRTConfig(type="tensorrt", engine_cache_dir=tmp_path)
    if supported:
        assert make_backend(tiny_bundle, config, max_batch=2).name == "tensorrt"
    else:
        with pytest.raises(BackendError, match=r"TensorRT 10.x is supported, found .*tensorrt-cu13>=10.13,<11"):
            make_backend(tiny_bundle, config, max_batch=2)


@pytest.mark.parametrize("version, broken", [("11.0.0", None), ("10.0.1", TypeError("deserialize_cuda_engine(): incompatible"))])
def test_fake_gpu_any_tensorrt_setup_failure_lets_auto_fall_back(tiny_bundle, fake_gpu, monkeypatch, caplog, version, broken):
    monkeypatch.setattr(FakeTRT, "__version__", version)
    if broken is not None:
        def raise_(*_args):
            raise broken

        monkeypatch.setattr(FakeTRT.Runtime, "deserialize_cuda_engine", raise_)
        monkeypatch.setattr(FakeTRT.Builder, "build_serialized_network", raise_)
    monkeypatch.setattr(backends_module, "tensorrt_usable", lambda: (True, "pretend"))
    monkeypatch.setattr(backends_module, "torch_cuda_usable", lambda bundle: (False, "pretend"))
    assert make_backend(tiny_bundle, AutoBackendConfig(type="auto")).name == "onnxruntime"
    assert "TensorRT failed" in caplog.text


def test_fake_gpu_backend_builds_caches_binds_and_matches_onnxruntime(tiny_bundle, tmp_path, fake_gpu):
    config = TensorRTConfig(type="tensorrt", precision="fp16", engine_cache_dir=tmp_path, workspace_mb=64)
    backend = make_backend(tiny_bundle, config, max_batch=4)
    (build,) = fake_gpu.builds
    # fp16 with YOLOX's in-graph decode held in fp32 (streamd.backends.tensorrt_build): the constraint is obeyed
    assert build["flags"] == {"fp16", "obey_precision_constraints"} and build["profiles"][0].shapes["images"] == ((1, 3, 64, 64), (4, 3, 64, 64), (4, 3, 64, 64))
    assert backend.engine_path.parent == tmp_path and "fake-gpu-80gb-trt10.0.1-fp16-b4" in backend.engine_path.name
    assert json.loads(backend.engine_path.with_suffix(".json").read_text())["gpu_name"] == "Fake GPU 80GB"
    reference = make_backend(tiny_bundle, ORT, 4)
    batches = [np.random.default_rng(i).uniform(0, 255, (n, 3, 64, 64)).astype(np.float32) for i, n in enumerate((4, 1, 3))]
    pending = [backend.submit_tensor(b) for b in batches]  # three in flight over two slots: the first is collected on reuse
    for handle, batch in zip(pending, batches):
        np.testing.assert_allclose(handle.wait(), reference.submit_tensor(batch).wait(), rtol=1e-5)
    with pytest.raises(BackendError, match="1..4"):
        backend.submit_tensor(images(5))
    backend.close()
    again = make_backend(tiny_bundle, config, max_batch=4)  # from the cache: no second build
    assert len(fake_gpu.builds) == 1 and again.engine_path == backend.engine_path


def test_fake_gpu_int8_needs_a_calibrator_and_build_engine_uses_it(tiny_bundle, tmp_path, fake_gpu):
    config = TensorRTConfig(type="tensorrt", precision="int8", engine_cache_dir=tmp_path)
    with pytest.raises(BackendError, match="trainer build-engine"):
        make_backend(tiny_bundle, config, max_batch=2)
    calibrator = FakeCalibrator(2, batches=1)
    path = build_engine(tiny_bundle, precision="int8", max_batch=2, engine_cache_dir=tmp_path, calibrator=calibrator)
    assert fake_gpu.builds[-1]["calibrator"] is calibrator and fake_gpu.builds[-1]["flags"] == {"fp16", "int8", "obey_precision_constraints"}
    backend = make_backend(tiny_bundle, config, max_batch=2)  # the daemon loads the calibrated engine
    assert backend.engine_path == path and len(fake_gpu.builds) == 1
    assert backend.submit_tensor(images(2, 255.0)).wait()[:, 0, 4] == pytest.approx(1.0)
