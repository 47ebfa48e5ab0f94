"""A model that outputs NaN, infinities or boxes without area: the detections stay finite, the rows are counted,
and the message it makes is strict JSON."""

import json
import time

import numpy as np
import pytest

from streamd.backends.base import FunctionBackend
from streamd.messages import encode, encode_message
from streamd.detector import Detector
from streamd.model.postprocess import decode_output
from streamd.ops.metrics import Metrics
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.types import Batch, Frame, Latency, ModelRef

INPUT_HW = (64, 64)
ANCHORS = 8


def _broken_output(batch: np.ndarray) -> np.ndarray:
    """float32 [N, 8, 6]: one good box, then NaN / inf in a box, a score, an objectness, a zero-width box,
    an inverted box, a box that overflows to inf, and a box wholly outside the frame."""
    good = [20, 20, 10, 10, 0.9, 1.0]
    rows = np.array([
        good,
        [np.nan, 20, 10, 10, 0.9, 1.0],
        [30, 30, 10, 10, 0.9, np.inf],
        [30, 30, 10, 10, np.inf, 1.0],
        [40, 40, 0, 10, 0.9, 1.0],
        [40, 40, -10, 10, 0.9, 1.0],
        [3e38, 3e38, 3e38, 3e38, 0.9, 1.0],
        [500, 500, 10, 10, 0.9, 1.0],
    ], np.float32)  # fmt: skip
    return np.repeat(rows[None], len(batch), axis=0)


def test_decode_output_drops_and_counts_invalid_rows():
    output = _broken_output(np.zeros((2, 3, *INPUT_HW), np.float32))
    decoded = decode_output(output, np.ones(2, np.float32), [INPUT_HW] * 2, 0.3, 0.45)
    assert decoded.invalid_boxes == (7, 7)
    for detections in decoded.detections:
        assert len(detections) == 1
        np.testing.assert_allclose(detections.xyxy[0], [15, 15, 25, 25])


def test_a_model_that_outputs_nan_makes_strict_json_messages():
    detector = Detector(FunctionBackend(_broken_output, INPUT_HW), INPUT_HW, ("cell",), name="broken", sha256="ab" * 32)
    image = np.zeros((*INPUT_HW, 3), np.uint8)
    (detections,) = detector.detect([image], conf_threshold=0.3, iou_threshold=0.45)
    assert np.isfinite(detections.xyxy).all() and np.isfinite(detections.confidence).all()
    frame = Frame(stream_id="cam", seq=0, pts_s=0.0, image=image, decoded_at=time.time())
    message = encode_message(frame, detections, ModelRef("broken", "ab" * 32, ("cell",)), Latency(1, 1, 1, 3))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    parsed = json.loads(message, parse_constant=refuse)  # a strict parser: NaN / Infinity raise
    assert [d["box"] for d in parsed["detections"]] == [[15.0, 15.0, 25.0, 25.0]]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_numbers(value):
    with pytest.raises(ValueError, match=r"'streamd.detections/2' of stream 'cam' is not JSON"):
        encode({"schema": "streamd.detections/2", "stream": "cam", "score": value})


def test_the_inference_stage_counts_the_invalid_rows_per_stream():
    detector = Detector(FunctionBackend(_broken_output, INPUT_HW), INPUT_HW, ("cell",), name="broken", sha256="ab" * 32)
    metrics = Metrics(["a", "b"])
    frames = tuple(Frame(sid, 0, 0.0, np.zeros((*INPUT_HW, 3), np.uint8), decoded_at=time.time()) for sid in "aab")
    (in_flight,) = SubmitStage(detector, 0.3, 0.45).process(Batch(frames, time.time()))
    results = list(ResultsStage(detector, metrics).process(in_flight))
    assert [len(r.detections) for r in results] == [1, 1, 1]
    counts = {c.stream_id: dict(c.counts)["invalid_boxes"] for c in metrics.counts()}
    assert counts == {"a": 14, "b": 7}  # 7 per image, counted in its stream: /metrics and the summary show them
