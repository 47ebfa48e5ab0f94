"""Inference in two stages, so one batch can be prepared while the previous one computes:

    Batch --> SubmitStage (Detector.submit) --> InFlight --> ResultsStage (Pending.wait) --> FrameResult

On the CPU (ONNX Runtime) SubmitStage letterboxes on the host and runs the
model, and ResultsStage's wait decodes and NMSes with NumPy; on a device
(torch, TensorRT) the frames go up as decoded and all of it runs there
(streamd.backends.base).

The runner gathers the Batch (up to max_batch frames or max_wait_ms, fairly
across streams, see `streamd.pipeline.queues.Batcher`). `compose` puts a
queue between the two stages: with an asynchronous backend (a GPU) the copy
and letterbox of batch k+1 overlap the model on batch k; with a synchronous
one (ONNX Runtime) the model on batch k+1 overlaps the NMS of batch k.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from streamd.backends.base import Pending, Picture
from streamd.detector import Detector
from streamd.model.postprocess import Decoded
from streamd.ops.metrics import Metrics
from streamd.types import Batch, Frame, FrameResult, Latency, ModelRef


@dataclass(frozen=True, slots=True)
class InFlight:
    """A submitted batch: the batch, the backend's Pending of it, and when its submission began (perf_counter)."""

    batch: Batch
    pending: Pending[Decoded]
    began: float

    control: ClassVar[bool] = False
    key: ClassVar[None] = None

    @property
    def stream_id(self) -> None:
        """A batch belongs to no single stream."""
        return None

    @property
    def frames(self) -> tuple[Frame, ...]:
        return self.batch.frames


class SubmitStage:
    """Batch -> InFlight: start the detector on the frames (thresholds: None takes the bundle's).

    setup() warms the backend up (at batch 1 and at max_batch) before READY=1.
    The backend belongs to whoever made it (streamd.pipeline.daemon), which closes it.
    """

    name = "submit"

    def __init__(
        self, detector: Detector, conf_threshold: float | None = None, iou_threshold: float | None = None,
        warmup_runs: int = 2,
    ):  # fmt: skip
        self.detector = detector
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.warmup_runs = warmup_runs

    def setup(self) -> None:
        self.detector.warm_up(self.warmup_runs)

    def process(self, batch: Batch) -> Iterator[InFlight]:
        began = time.perf_counter()
        pictures = [Picture(frame.image, frame.layout, frame.scale, (frame.height, frame.width)) for frame in batch.frames]
        pending = self.detector.submit(self.detector.batch(pictures, self.conf_threshold, self.iou_threshold))
        yield InFlight(batch, pending, began)

    def close(self) -> None:
        pass


class ResultsStage:
    """InFlight -> one FrameResult per frame (same order): boxes in source pixels, latency (the message is encoded
    later, by each stream's message stage after its tracker).

    Every result is counted in `metrics` (processed, detections, latency samples).
    """

    name = "results"

    def __init__(self, detector: Detector, metrics: Metrics):
        self.detector = detector
        self.metrics = metrics
        self.model = ModelRef(name=detector.name, sha256=detector.sha256, class_names=detector.class_names)

    def setup(self) -> None:
        pass

    def process(self, in_flight: InFlight) -> Iterator[FrameResult]:
        decoded = in_flight.pending.wait()
        infer_ms = (time.perf_counter() - in_flight.began) * 1e3
        now = time.time()
        batch = in_flight.batch
        for frame, detections, invalid in zip(batch.frames, decoded.detections, decoded.invalid_boxes):
            if invalid:
                self.metrics.count(frame.stream_id, "invalid_boxes", invalid)
            latency = Latency(
                decode_ms=frame.decode_ms,
                queue_ms=max(0.0, (batch.gathered_at - frame.decoded_at) * 1e3),
                infer_ms=infer_ms,
                total_ms=frame.age_ms(now),
            )
            self.metrics.result(frame.stream_id, len(detections), latency)
            yield FrameResult(frame=frame, detections=detections, model=self.model, latency=latency,
                              batch_size=len(batch.frames))

    def close(self) -> None:
        pass
