"""streamd.stages.infer: a batch across streams -> FrameBatch -> backend.submit -> wait (NMS) -> FrameResults.

The two stages run in a row here (the runner puts a queue between them).
"""

from __future__ import annotations

import time

import numpy as np
import pytest


from streamd.backends.base import FrameBatch, Ready
from streamd.backends.select import make_backend
from streamd.config import OnnxRuntimeConfig
from streamd.errors import BackendError
from streamd.model.detections import Detections
from streamd.model.postprocess import Decoded, yolox_anchors
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.types import BGR24, Batch, Frame, PixelLayout

# The tiny model's fixed anchor 1 (conftest): cx 44, cy 40, w 20, h 24 in the 64x64 input, class 1, score 0.9 x 0.8.
ANCHOR1_INPUT_XYXY = np.array([34, 28, 54, 52], np.float32)


def frame(stream_id: str, seq: int, size: tuple[int, int], value: int, decoded_at: float | None = None) -> Frame:
    width, height = size
    return Frame(
        stream_id, seq, seq / 25, np.full((height, width, 3), value, np.uint8),
        decoded_at=time.time() if decoded_at is None else decoded_at, decode_ms=1.5,
    )  # fmt: skip


class Infer:
    """SubmitStage then ResultsStage, as the runner runs them (with a queue between)."""

    def __init__(self, detector: Detector, conf_threshold=None, iou_threshold=None, warmup_runs: int = 2):
        self.metrics = Metrics(["s", "a", "b"])
        self.submit = SubmitStage(detector, conf_threshold, iou_threshold, warmup_runs)
        self.results = ResultsStage(detector, self.metrics)

    def setup(self) -> None:
        self.submit.setup()

    def process(self, batch: Batch) -> list:
        return [result for in_flight in self.submit.process(batch) for result in self.results.process(in_flight)]


def ort(bundle, max_batch: int) -> Detector:
    return Detector.for_bundle(bundle, make_backend(bundle, OnnxRuntimeConfig(type="onnxruntime", threads=1), max_batch))


@pytest.fixture(scope="module")
def stage(tiny_bundle) -> Infer:
    infer = Infer(ort(tiny_bundle, 4))
    infer.setup()
    return infer


@pytest.mark.parametrize(
    "size, value, expected_classes, expected_anchor1",
    [
        # 160x120: scale 0.4; anchor 0's objectness = mean of the letterboxed input / 255
        ((160, 120), 255, [0, 1], [85, 70, 135, 120]),  # bright: (255*48 + 114*16)/64/255 = 0.86 -> kept
        ((160, 120), 0, [1], [85, 70, 135, 120]),  # dark: 28.5/255 = 0.11 < 0.3 -> only anchor 1
        ((320, 240), 0, [1], [170, 140, 270, 240]),  # scale 0.2, clipped to the frame's height
        ((64, 64), 0, [1], ANCHOR1_INPUT_XYXY.tolist()),  # scale 1
    ],
)
def test_boxes_in_source_pixels_table(stage, size, value, expected_classes, expected_anchor1):
    (result,) = stage.process(Batch((frame("s", 0, size, value),), time.time()))
    assert sorted(result.detections.class_id.tolist()) == expected_classes
    anchor1 = result.detections[result.detections.class_id == 1]
    np.testing.assert_allclose(anchor1.xyxy[0], expected_anchor1, atol=0.01)
    assert anchor1.confidence[0] == pytest.approx(0.72)


def test_one_result_per_frame_in_order_across_streams_and_sizes(stage, tiny_bundle):
    frames = (frame("a", 0, (160, 120), 0), frame("b", 0, (320, 240), 0), frame("a", 1, (160, 120), 255))
    results = list(stage.process(Batch(frames, time.time())))
    assert [(r.frame.stream_id, r.frame.seq) for r in results] == [("a", 0), ("b", 0), ("a", 1)]
    assert [len(r.detections) for r in results] == [1, 1, 2]
    assert all(r.batch_size == 3 for r in results)
    assert results[0].model.sha256 == tiny_bundle.sha256 and results[0].model.class_names == tiny_bundle.class_names


def test_latency_fields(stage):
    decoded_at = time.time() - 0.050
    started_at = decoded_at + 0.020
    (result,) = stage.process(Batch((frame("s", 0, (160, 120), 0, decoded_at=decoded_at),), started_at))
    latency = result.latency
    assert latency.decode_ms == 1.5
    assert latency.queue_ms == pytest.approx(20.0, abs=0.01)
    assert latency.infer_ms > 0
    # total: from the packet leaving the demuxer (decode included) to the detections
    assert latency.total_ms >= 50.0 + 1.5 and latency.total_ms >= latency.decode_ms + latency.queue_ms + latency.infer_ms


@pytest.mark.parametrize(
    "conf_threshold, iou_threshold, expected_count",
    [(None, None, 2), (0.8, None, 1), (0.95, None, 0), (0.05, 0.01, 2)],
)
def test_thresholds_override_the_bundle(tiny_bundle, conf_threshold, iou_threshold, expected_count):
    infer = Infer(ort(tiny_bundle, 2), conf_threshold, iou_threshold)
    (in_flight,) = infer.submit.process(Batch((frame("s", 0, (160, 120), 255),), time.time()))
    assert in_flight.pending.batch.conf_threshold == (0.3 if conf_threshold is None else conf_threshold)  # the bundle's
    assert in_flight.pending.batch.iou_threshold == (0.45 if iou_threshold is None else iou_threshold)
    (result,) = infer.results.process(in_flight)
    assert len(result.detections) == expected_count


class CountingBackend:
    """A backend that records the batches it was given (`batches`; the model alone: `tensor_calls`) and counts the
    waits; it finds one box per picture, the picture's whole source."""

    name = "counting"
    pixel_formats = frozenset({"bgr24"})
    precision = "fp32"

    def __init__(self, max_batch: int, anchors: int = yolox_anchors((64, 64)), classes: int = 3):
        self.max_batch = max_batch
        self.batches: list[FrameBatch] = []
        self.tensor_calls: list[int] = []
        self.shape = (anchors, 5 + classes)
        self.waited = 0

    @property
    def calls(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def submit(self, batch: FrameBatch):
        batch.check(self)
        self.batches.append(batch)
        backend = self

        class Handle:
            def wait(self) -> Decoded:
                backend.waited += 1
                return Decoded.uncounted([Detections(np.array([[0, 0, w, h]], np.float32), np.array([0.9], np.float32),
                                                     np.array([1])) for h, w in batch.source_hw()])  # fmt: skip

        return Handle()

    def submit_tensor(self, tensor: np.ndarray):
        self.tensor_calls.append(len(tensor))
        return Ready(np.zeros((len(tensor), *self.shape), np.float32))

    def close(self) -> None:
        pass


def test_a_batch_larger_than_the_backend_is_run_in_chunks(tiny_bundle):
    backend = CountingBackend(max_batch=2)
    infer = Infer(Detector.for_bundle(tiny_bundle, backend))
    results = infer.process(Batch(tuple(frame("s", i, (64, 64), 0) for i in range(5)), time.time()))
    assert backend.calls == [2, 2, 1] and len(results) == 5 and backend.waited == 3


def test_submit_returns_before_the_output_is_waited_for(tiny_bundle):
    """The asynchronous interface: SubmitStage only submits; ResultsStage waits (in another worker)."""
    backend = CountingBackend(max_batch=4)
    infer = Infer(Detector.for_bundle(tiny_bundle, backend))
    (in_flight,) = infer.submit.process(Batch((frame("s", 0, (64, 64), 0),), time.time()))
    assert backend.calls == [1] and backend.waited == 0
    assert len(list(infer.results.process(in_flight))) == 1 and backend.waited == 1


def test_a_synchronous_backend_is_the_trivial_case(tiny_bundle):
    assert Ready(np.zeros(3)).wait().shape == (3,)


def test_setup_checks_the_model_then_warms_up_at_batch_1_and_max_batch(tiny_bundle):
    backend = CountingBackend(max_batch=4)
    infer = Infer(Detector.for_bundle(tiny_bundle, backend), warmup_runs=2)
    infer.setup()
    assert backend.tensor_calls == [1, 4] and backend.calls == [1, 1, 4, 4] and backend.waited == 4
    assert {batch.formats for batch in backend.batches} == {frozenset({"bgr24"})}


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one frame"):
        Batch((), time.time())


PLANES_709 = PixelLayout("yuv420p", "bt709")


class DeviceBackend(CountingBackend):
    """A device backend double: takes the decoder's planes too."""

    name = "device"
    pixel_formats = frozenset({"bgr24", "yuv420p"})


def test_a_device_backend_gets_the_pictures_as_decoded_in_chunks_with_the_thresholds(tiny_bundle):
    backend = DeviceBackend(max_batch=2)
    infer = Infer(Detector.for_bundle(tiny_bundle, backend), conf_threshold=0.6, iou_threshold=0.5)
    planes = Frame("s", 0, 0.0, np.zeros((180, 160), np.uint8), time.time(), layout=PLANES_709)  # 160x120
    scaled = Frame("a", 0, 0.0, np.zeros((32, 64, 3), np.uint8), time.time(), source_hw=(64, 128), scale=0.5)
    bgr = frame("b", 0, (100, 50), 0)
    results = infer.process(Batch((planes, scaled, bgr), time.time()))
    given = [[(p.image.shape, p.layout, p.prescale, p.source_hw) for p in batch.pictures] for batch in backend.batches]
    assert given == [
        [((180, 160), PLANES_709, 1.0, (120, 160)), ((32, 64, 3), BGR24, 0.5, (64, 128))],
        [((50, 100, 3), BGR24, 1.0, (50, 100))],
    ]  # fmt: skip
    assert {(batch.conf_threshold, batch.iou_threshold) for batch in backend.batches} == {(0.6, 0.5)}
    assert [r.detections.xyxy.tolist() for r in results] == [[[0, 0, 160, 120]], [[0, 0, 128, 64]], [[0, 0, 100, 50]]]


def test_setup_warms_a_device_backend_up_on_planes_too(tiny_bundle):
    """Every batch size (cuDNN autotunes each on first use without CUDA graphs), BGR and planes, `runs` times."""
    backend = DeviceBackend(max_batch=3)
    Infer(Detector.for_bundle(tiny_bundle, backend), warmup_runs=2).setup()
    assert backend.tensor_calls == [1, 3]
    assert backend.calls == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert {batch.formats for batch in backend.batches} == {frozenset({"bgr24"}), frozenset({"yuv420p"})}
    assert backend.batches[0].pictures[0].image.shape == (64, 64, 3) and backend.batches[2].pictures[0].image.shape == (96, 64)


def test_planes_for_a_host_backend_are_refused(tiny_bundle):
    infer = Infer(Detector.for_bundle(tiny_bundle, CountingBackend(max_batch=2)))
    planes = Frame("s", 0, 0.0, np.zeros((180, 160), np.uint8), time.time(), layout=PixelLayout("yuv420p"))
    with pytest.raises(BackendError, match=r"backend counting: takes \['bgr24'\] images only, got \['yuv420p'\]"):
        infer.process(Batch((planes,), time.time()))
    with pytest.raises(BackendError, match=r"backend onnxruntime: takes \['bgr24'\] images only, got \['yuv420p'\]"):
        Infer(ort(tiny_bundle, 2)).process(Batch((planes,), time.time()))


@pytest.mark.parametrize("shape", [(181, 160), (180, 161), (120, 160, 3)])
def test_a_frame_with_planes_of_the_wrong_shape_is_refused(shape):
    with pytest.raises(ValueError, match=r"stream 's' frame 0: expected uint8 \[H \* 3 / 2, W\] yuv420p planes"):
        Frame("s", 0, 0.0, np.zeros(shape, np.uint8), time.time(), layout=PixelLayout("yuv420p"))


def test_the_detector_joins_the_chunks_of_a_large_batch_and_takes_an_empty_one(tiny_bundle):
    detector = ort(tiny_bundle, 2)
    images = [np.full((120, 160, 3), 255 if i % 2 else 0, np.uint8) for i in range(5)]
    assert [len(found) for found in detector.detect(images)] == [1, 2, 1, 2, 1]  # in order across the 3 chunks
    assert detector.detect([]) == []
