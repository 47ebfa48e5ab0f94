"""streamd.backends.torch: the shipped bundle's weights on PyTorch give ONNX Runtime's detections on the whole BCCD
test split, by streamd.model.compare at the precision's bar (assert_parity: on the CPU here, and, marked gpu, on CUDA
in every precision with and without CUDA graphs; the device letterbox itself: test_device_ops.py). The CUDA code path
(slots, graphs) runs here on the recording runtime (fake_gpu.py), which checks the order on the streams, and on the
simulated one (sim_cuda.py), whose streams run later in threads of their own under a happens-before checker."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from streamd.backends import cuda_slots
from streamd.backends import select as select_module
from streamd.backends import torch as torch_module
from streamd.backends.select import make_backend, torch_cuda_usable
from streamd.backends.device_ops import GridDecode
from streamd.backends.torch import TorchBackend, batch_buckets
from streamd.config import AutoBackendConfig, OnnxRuntimeConfig, TorchConfig
from streamd.errors import BackendError
from streamd.model import load_bundle
from streamd.model.compare import BARS, compare
from streamd.detector import Detector
from streamd.model.postprocess import postprocess
from streamd.model.preprocess import letterbox_batch
from streamd.types import BGR24

from tests.streamd.backends import fake_gpu
from tests.streamd.backends.fake_gpu import CALLS, current_stream, note
from tests.streamd.backends.sim_cuda import SimRuntime

REPO = Path(__file__).parents[3]
SHIPPED = REPO / "models" / "bccd-nano.bundle"
ORT = OnnxRuntimeConfig(type="onnxruntime", threads=1)
CPU = TorchConfig(type="torch", device="cpu")
CONF, IOU = 0.3, 0.45
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(SHIPPED)


@pytest.fixture(scope="module")
def bccd_images(bccd_root) -> list[np.ndarray]:
    """Twelve BCCD test images (640x480 BGR), a few of them resized so that the batch mixes frame sizes."""
    names = (bccd_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:12]
    images = [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]
    images[3] = cv2.resize(images[3], (1280, 960))
    images[7] = cv2.resize(images[7], (320, 200))
    return images


@pytest.fixture(scope="module")
def test_split(bccd_root) -> list[np.ndarray]:
    """The whole BCCD test split (72 images, 640x480 BGR): what the bars of streamd.model.compare were measured on."""
    names = (bccd_root / "ImageSets" / "Main" / "test.txt").read_text().split()
    return [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]


@pytest.fixture(scope="module")
def onnxruntime_reference(shipped, test_split) -> list:
    """ONNX Runtime fp32's detections of the test split through streamd's Detector (OpenCV letterbox, NumPy NMS)."""
    reference = Detector.for_bundle(shipped, make_backend(shipped, ORT, max_batch=4)).detect(test_split, CONF, IOU)
    assert sum(len(d) for d in reference) > 10 * len(test_split)  # real cells were found (1,135 boxes)
    return reference


def assert_within_bar(reference, found, precision: str, what: str = "") -> None:
    """streamd.model.compare at BARS[precision]: no mismatch, and NMS flips within the bar's fraction."""
    bar = BARS[precision]
    comparison = compare(reference, found, bar, conf_threshold=CONF)
    assert comparison.ok and comparison.flip_fraction <= bar.max_flip_fraction, f"{what}{comparison.summary()}"


def assert_parity(bundle, backend, images, reference, precision: str) -> None:
    """The backend's detections of `images` through its host path (submit_tensor, then streamd's NumPy NMS) and through
    its device path (submit: device letterbox and NMS) are the reference's within BARS[precision]."""
    host_path = []
    for start in range(0, len(images), backend.max_batch):
        chunk = images[start : start + backend.max_batch]
        tensor, scales = letterbox_batch(chunk, bundle.meta.input_hw, bundle.meta.preprocess)
        host_path += postprocess(backend.submit_tensor(tensor).wait(), scales, [image.shape[:2] for image in chunk], CONF, IOU)
    assert_within_bar(reference, host_path, precision, "host path: ")
    assert_within_bar(reference, frames_in(backend, images), precision, "device path: ")


# --- configuration and selection -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, precision, error",
    [
        ({}, "fp16", None),
        ({"device": "cpu"}, "fp32", None),
        ({"device": "cpu", "precision": "fp32"}, "fp32", None),
        ({"device": "cuda:1", "precision": "bf16", "cuda_graphs": False}, "bf16", None),
        ({"device": "cpu", "precision": "fp16"}, None, "device cpu runs fp32 only"),
        ({"device": "cuda"}, None, "device"),
        ({"device": "gpu0"}, None, "device"),
        ({"precision": "int8"}, None, "precision"),
    ],
)
def test_torch_config(fields, precision, error):
    if error:
        with pytest.raises(ValidationError, match=error):
            TorchConfig(type="torch", **fields)
    else:
        assert TorchConfig(type="torch", **fields).compute_precision == precision


@pytest.mark.parametrize("max_batch, buckets", [(1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16))])
def test_batch_buckets(max_batch, buckets):
    assert batch_buckets(max_batch) == buckets


def test_a_bundle_without_weights_is_refused_with_how_to_reexport(tiny_bundle):
    with pytest.raises(BackendError, match=r"no weights.safetensors.*trainer export RUN_DIR -o .*trainer.export.recover"):
        make_backend(tiny_bundle, CPU)
    assert torch_cuda_usable(tiny_bundle) == (False, f"{tiny_bundle.path} has no weights.safetensors for the torch backend")


def test_cuda_without_a_gpu_is_a_backend_error(shipped):
    if not NO_CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="no CUDA GPU is available"):
        make_backend(shipped, TorchConfig(type="torch", device="cuda:0"))


@pytest.mark.parametrize(
    "tensorrt, torch_cuda, torch_builds, chosen, logged",
    [
        (False, False, True, "onnxruntime", "ONNX Runtime on the CPU (not TensorRT: no trt; not torch on cuda:0: no gpu)"),
        (False, True, True, "torch", "backend auto: torch on cuda:0"),
        (False, True, False, "onnxruntime", "torch on cuda:0 failed (no CUDA here)"),
    ],
)
def test_auto_prefers_tensorrt_then_torch_on_cuda_then_onnxruntime(
    shipped, monkeypatch, caplog, tensorrt, torch_cuda, torch_builds, chosen, logged
):
    import streamd.backends.torch as torch_module

    monkeypatch.setattr(select_module, "tensorrt_usable", lambda: (tensorrt, "no trt"))
    monkeypatch.setattr(select_module, "torch_cuda_usable", lambda bundle: (torch_cuda, "no gpu" if not torch_cuda else "pretend"))

    class Built:
        name, max_batch = "torch", 8

        def __init__(self, bundle, config, max_batch):
            if not torch_builds:
                raise BackendError("no CUDA here")
            assert config.device == "cuda:0" and config.compute_precision == "fp16"

    monkeypatch.setattr(torch_module, "TorchBackend", Built)
    caplog.set_level(logging.INFO, logger="streamd.backends.select")
    assert make_backend(shipped, AutoBackendConfig(type="auto")).name == chosen
    assert logged in caplog.text


# --- the model on the CPU ------------------------------------------------------------------------


def test_grid_decode_is_yoloxs_decode(shipped):
    """GridDecode on the raw head output equals YOLOX's own decode_in_inference."""
    from streamd.backends.torch import load_model

    net = load_model(shipped)
    images = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (2, 3, 416, 416)).astype(np.float32))
    with torch.inference_mode():
        ours = net(images)
        net.model.head.decode_in_inference = True
        theirs = net.model(images)
    assert isinstance(net.decode, GridDecode) and ours.shape == theirs.shape == (2, 3549, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.fixture(scope="module")
def cpu_backend(shipped):
    backend = make_backend(shipped, CPU, max_batch=4)
    yield backend
    backend.close()


def test_cpu_backend_raw_output_equals_onnxruntime(shipped, cpu_backend, bccd_images):
    assert isinstance(cpu_backend, TorchBackend) and cpu_backend.name == "torch"
    tensor, _ = letterbox_batch(bccd_images[:4], shipped.meta.input_hw, shipped.meta.preprocess)
    theirs = make_backend(shipped, ORT, max_batch=4).submit_tensor(tensor).wait()
    ours = cpu_backend.submit_tensor(tensor).wait()
    assert ours.shape == theirs.shape == (4, 3549, 8) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[..., 4:], theirs[..., 4:], atol=1e-4)
    np.testing.assert_allclose(ours[..., :4], theirs[..., :4], rtol=1e-4, atol=1e-2)
    with pytest.raises(BackendError, match="1..4"):
        cpu_backend.submit_tensor(np.zeros((5, 3, 416, 416), np.float32))


def frames_in(backend, images, prescales=None, source_hw=None):
    """One Backend.submit per max_batch images of bgr24 frames; the Detections of each."""
    prescales = prescales or [1.0] * len(images)
    source_hw = source_hw or [image.shape[:2] for image in images]
    found = []
    for start in range(0, len(images), backend.max_batch):
        chunk = slice(start, start + backend.max_batch)
        pending = backend.submit(fake_gpu.frame_batch(images[chunk], [BGR24] * len(images[chunk]), prescales[chunk], source_hw[chunk], CONF, IOU))
        found.extend(pending.wait().detections)
    return found


def test_cpu_backend_gives_onnxruntimes_detections_frame_by_frame(shipped, cpu_backend, test_split, onnxruntime_reference):
    """The GPU tests' check (assert_parity), on the CPU: the host path and submit (device letterbox and NMS)."""
    assert "yuv420p" in cpu_backend.pixel_formats
    assert_parity(shipped, cpu_backend, test_split, onnxruntime_reference, "fp32")


def test_submit_divides_boxes_by_letterbox_scale_and_prescale(shipped, cpu_backend, bccd_images):
    """Frames the decoder already scaled by 0.5 for a source of twice their size: boxes come back in source pixels."""
    frames = bccd_images[2:6]  # one 1280x960 among 640x480
    source_hw = [(image.shape[0] * 2, image.shape[1] * 2) for image in frames]
    detections = cpu_backend.submit(fake_gpu.frame_batch(frames, [BGR24] * 4, [0.5] * 4, source_hw, CONF, IOU)).wait().detections
    tensor, scales = letterbox_batch(frames, shipped.meta.input_hw, shipped.meta.preprocess)
    expected = postprocess(cpu_backend.submit_tensor(tensor).wait(), scales * 0.5, source_hw, CONF, IOU)
    assert sum(len(d) for d in expected) > 20
    assert_within_bar(expected, detections, "fp32")
    for got, (height, width) in zip(detections, source_hw):
        assert (got.xyxy[:, 2] <= width).all() and (got.xyxy[:, 3] <= height).all()
        assert got.xyxy[:, 2].max() > frames[0].shape[1]  # in source pixels, beyond the half-size frame


@pytest.mark.parametrize("call", ["submit", "submit_tensor"])
def test_cpu_backend_refuses_batches_over_max_batch(cpu_backend, call):
    with pytest.raises(BackendError, match=r"backend torch: batch of 5 frames, it takes 1..4"):
        if call == "submit_tensor":
            cpu_backend.submit_tensor(np.zeros((5, 3, 416, 416), np.float32))
        else:
            cpu_backend.submit(fake_gpu.frame_batch([np.zeros((8, 8, 3), np.uint8)] * 5, [BGR24] * 5, [1.0] * 5, [(8, 8)] * 5, CONF, IOU))


# --- the CUDA code path on the recording runtime (fake_gpu.py): slots, streams and graphs on the CPU ----------


class NotedModel(torch.nn.Module):
    """The model, noting ("model") on the stream it runs on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.decode = net, net.decode

    def forward(self, images):
        note(current_stream(), "model")
        return self.net(images)


@pytest.fixture
def recorded_cuda_backend(shipped, recording_cuda, monkeypatch):
    load_model = torch_module.load_model
    monkeypatch.setattr(torch_module, "load_model", lambda bundle: NotedModel(load_model(bundle)))
    made = []

    def make(cuda_graphs: bool):
        config = TorchConfig(type="torch", device="cuda:0", precision="fp32", cuda_graphs=cuda_graphs)
        made.append(TorchBackend(shipped, config, max_batch=4))
        CALLS.clear()
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def on_compute(slot: int, *middle: str) -> list:
    return [("compute", "wait uploaded", slot), *[("compute", m, None) for m in middle], ("compute", "output", slot)]


def batch_order(slot: int, bucket: int) -> list:
    """A letterboxed batch through a CUDA graph: upload, graph, its output into the slot's, to the host, done."""
    return [("upload", "h2d", slot), ("upload", "record uploaded", slot), *on_compute(slot, f"replay {bucket}", "model"),
            ("compute", "d2h", slot), ("compute", "record done", slot)]  # fmt: skip


@pytest.mark.parametrize("cuda_graphs, model", [(False, ("model",)), (True, ("replay 4", "model"))])
def test_cuda_path_frames_order_and_detections_equal_the_cpus(
    recorded_cuda_backend, cpu_backend, bccd_images, monkeypatch, cuda_graphs, model
):
    frames = bccd_images[:3]  # 3 frames: bucket 4, padded
    expected = frames_in(cpu_backend, frames)
    backend = recorded_cuda_backend(cuda_graphs)
    monkeypatch.setattr(cuda_slots, "letterbox_frames", fake_gpu.recorded(cuda_slots.letterbox_frames, "letterbox"))
    detections = frames_in(backend, frames)
    assert CALLS == [("upload", "h2d", 0), ("upload", "letterbox", None), ("upload", "record uploaded", 0),
                     *on_compute(0, *model), ("compute", "record done", 0), ("host", "wait done", 0)]  # fmt: skip
    assert sum(len(d) for d in expected) > 10
    for ours, theirs in zip(detections, expected):
        np.testing.assert_allclose(ours.xyxy, theirs.xyxy, atol=1e-3)
        np.testing.assert_allclose(ours.confidence, theirs.confidence, atol=1e-5)


def test_cuda_path_batches_in_flight_reuse_slots_after_their_batch(recorded_cuda_backend, cpu_backend, shipped, bccd_images):
    backend = recorded_cuda_backend(cuda_graphs=True)
    batches = [letterbox_batch(bccd_images[i : i + n], shipped.meta.input_hw, shipped.meta.preprocess)[0]
               for i, n in ((0, 2), (2, 1), (3, 2))]  # fmt: skip
    pending = [backend.submit_tensor(batch) for batch in batches]
    assert CALLS == batch_order(0, 2) + batch_order(1, 1) + [("host", "wait done", 0)] + batch_order(0, 2)
    for handle, batch in zip(pending, batches):  # the first batch's output survived its slot's reuse
        np.testing.assert_allclose(handle.wait(), cpu_backend.submit_tensor(batch).wait(), atol=1e-4)


# --- the CUDA code path on the simulated GPU (sim_cuda.py): streams that run later, a happens-before checker ------


@pytest.fixture
def sim_cuda_backend(shipped, monkeypatch):
    """make(cuda_graphs): a fp32 TorchBackend on "cuda:0" whose runtime is sim_cuda.SimRuntime (seed 0)."""
    monkeypatch.setattr(cuda_slots, "CudaRuntime", SimRuntime)
    for flag in ("benchmark", "allow_tf32"):  # set process-wide by the backend; restored after the test
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    matmul = torch.backends.cuda.matmul  # a module proxy monkeypatch cannot set: restored by hand
    before, made = matmul.allow_tf32, []

    def make(cuda_graphs: bool) -> TorchBackend:
        config = TorchConfig(type="torch", device="cuda:0", precision="fp32", cuda_graphs=cuda_graphs)
        made.append(TorchBackend(shipped, config, max_batch=4))
        return made[-1]

    yield make
    for backend in made:
        backend.close()
    matmul.allow_tf32 = before


SIM_WORK = (("batch", 0, 2), ("frames", 2, 3), ("batch", 5, 1), ("frames", 6, 2), ("batch", 8, 3))  # (kind, first, count)


@pytest.mark.parametrize("cuda_graphs, results_thread", [(True, True), (False, True), (True, False)])
def test_cuda_path_on_the_simulated_gpu(sim_cuda_backend, cpu_backend, shipped, bccd_images, cuda_graphs, results_thread):
    """Letterboxed batches and batches of frames (mixed sizes; buckets 1, 2 and 4, padded) on streams that run
    later: every result is the CPU backend's for its own batch, no two accesses to a buffer were unordered, no replay
    touched what its graph did not capture, and no copy was refused (a pageable buffer).

    With a results thread, submitted by one thread and collected by another as the daemon does. Without, all
    submitted first and collected after, so that every batch is still in flight when the next one is submitted:
    the host learns nothing from a wait in between, and an access off its stream shows whatever the timing."""
    backend = sim_cuda_backend(cuda_graphs)
    runtime = backend.slots.runtime
    handed, collected, inputs = queue.Queue(), [], []

    def collect() -> None:
        while (pending := handed.get(timeout=300)) is not None:
            collected.append(pending.wait())

    results = threading.Thread(target=collect, name="results")
    if results_thread:
        results.start()
    try:
        for kind, first, count in SIM_WORK:
            frames = bccd_images[first : first + count]
            if kind == "batch":
                inputs.append(letterbox_batch(frames, shipped.meta.input_hw, shipped.meta.preprocess)[0])
                handed.put(backend.submit_tensor(inputs[-1]))
            else:
                inputs.append(frames)
                handed.put(backend.submit(fake_gpu.frame_batch(frames, [BGR24] * count, [1.0] * count, [i.shape[:2] for i in frames], CONF, IOU)))
    finally:
        handed.put(None)
        if results_thread:
            results.join(timeout=300)
        else:
            collect()
    assert len(collected) == len(SIM_WORK)
    assert runtime.races == [] and [f for stream in runtime.streams.values() for f in stream.failures] == []
    for (kind, _, _), given, result in zip(SIM_WORK, inputs, collected):
        if kind == "batch":
            np.testing.assert_allclose(result, cpu_backend.submit_tensor(given).wait(), rtol=1e-4, atol=1e-3)
        else:
            comparison = compare(frames_in(cpu_backend, given), result.detections, BARS["fp32"], conf_threshold=CONF)
            assert comparison.ok and comparison.flips == 0 and comparison.matched > 10, comparison.summary()


# --- CUDA (run by benchmarks/gpu_check.py on a GPU machine) ----------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_cuda_gives_onnxruntimes_detections(shipped, test_split, onnxruntime_reference, precision, cuda_graphs):
    """The whole BCCD test split, host and device paths, against ONNX Runtime fp32 at the precision's bar."""
    backend = make_backend(shipped, TorchConfig(type="torch", device="cuda:0", precision=precision, cuda_graphs=cuda_graphs), 4)
    try:
        assert_parity(shipped, backend, test_split, onnxruntime_reference, precision)
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_cuda_graphs_on_and_off_give_the_same_output(shipped, bccd_images):
    """At one batch size, a bucket's (4, so the graph's batch is not padded): both run the model on the same shapes.
    cuDNN autotunes each backend to kernels of its own, which may differ in the last bits: a tolerance, not equality."""
    tensor, _ = letterbox_batch(bccd_images[:4], shipped.meta.input_hw, shipped.meta.preprocess)
    outputs, found = [], []
    for graphs in (True, False):
        backend = make_backend(shipped, TorchConfig(type="torch", device="cuda:0", precision="fp32", cuda_graphs=graphs), 4)
        try:
            outputs.append(backend.submit_tensor(tensor).wait())
            found.append(frames_in(backend, bccd_images[:4]))
        finally:
            backend.close()
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-3, rtol=1e-4)
    assert_within_bar(found[1], found[0], "fp32")


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_submit_equals_the_cpu_backends(shipped, cpu_backend, bccd_images, cuda_graphs):
    """Mixed frame sizes and prescales, three batches over two slots in flight at once: the GPU's detections are the CPU's."""
    backend = make_backend(shipped, TorchConfig(type="torch", device="cuda:0", precision="fp32", cuda_graphs=cuda_graphs), 4)
    chunks = [(0, 4), (4, 1), (5, 3)]
    prescales = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 0.5, 1.0]
    source_hw = [(round(image.shape[0] / p), round(image.shape[1] / p)) for image, p in zip(bccd_images, prescales)]
    try:
        pending = [backend.submit(fake_gpu.frame_batch(bccd_images[i : i + n], [BGR24] * n, prescales[i : i + n], source_hw[i : i + n], CONF, IOU))
                   for i, n in chunks]  # fmt: skip
        on_gpu = [found for handle in pending for found in handle.wait().detections]
        on_cpu = frames_in(cpu_backend, bccd_images[:8], prescales, source_hw)
        assert sum(len(d) for d in on_cpu) > 50
        assert_within_bar(on_cpu, on_gpu, "fp32")
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU")
def test_cuda_batches_in_flight_stay_correct_and_run_from_another_thread(shipped, cpu_backend, bccd_images):
    device = f"cuda:{torch.cuda.device_count() - 1}"  # the last device: not the thread's current one on multi-GPU machines
    backend = make_backend(shipped, TorchConfig(type="torch", device=device, precision="fp32"), max_batch=4)
    batches = [letterbox_batch(bccd_images[i : i + n], shipped.meta.input_hw, shipped.meta.preprocess)[0]
               for i, n in ((0, 4), (4, 1), (5, 3))]  # fmt: skip
    results: dict[str, list] = {}

    def run() -> None:  # the daemon submits from its inference thread, not the thread that built the backend
        pending = [backend.submit_tensor(b) for b in batches]  # three over two slots: the first is collected on reuse
        frames = bccd_images[8:12]
        frames_pending = backend.submit(fake_gpu.frame_batch(frames, [BGR24] * 4, [1.0] * 4, [i.shape[:2] for i in frames], CONF, IOU))
        results["outputs"] = [p.wait() for p in pending]
        results["detections"] = frames_pending.wait().detections

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    try:
        assert "detections" in results, "the worker failed (see its exception above)"
        for output, batch in zip(results["outputs"], batches):
            np.testing.assert_allclose(output[..., 4:], cpu_backend.submit_tensor(batch).wait()[..., 4:], atol=0.02)
        assert_within_bar(frames_in(cpu_backend, bccd_images[8:12]), results["detections"], "fp32")
    finally:
        backend.close()


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("fp16", True)])
def test_fp32_on_cuda_is_ieee_fp32_not_tf32(recorded_cuda_backend, monkeypatch, precision, tf32):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default; restored after the test
    matmul = torch.backends.cuda.matmul  # a module proxy monkeypatch cannot set: restored by hand
    before, matmul.allow_tf32 = matmul.allow_tf32, True
    monkeypatch.setattr(torch_module, "DTYPES", {**torch_module.DTYPES, "fp16": torch.float32})  # fp16 convs are slow on the CPU
    config = TorchConfig(type="torch", device="cuda:0", precision=precision, cuda_graphs=False)
    try:
        TorchBackend(load_bundle(SHIPPED), config, max_batch=1).close()
        assert (torch.backends.cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
    finally:
        matmul.allow_tf32 = before
