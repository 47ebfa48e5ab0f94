"""Batch inference: frames from all streams -> letterbox -> backend -> decode + NMS -> FrameResults.

The runner gathers the batch (up to max_batch frames or max_wait_ms,
fairly across streams, see `streamd.pipeline.queues.FairQueueGroup`); this
stage turns it into one FrameResult per frame, boxes in source pixels.

It works in two halves so the runner can overlap batches on a GPU:
`submit(batch)` letterboxes and starts the backend, `finish(handle)` waits
for the output and runs NMS. `process(batch)` is the two in a row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from streamd.backends.base import Backend
from streamd.model.bundle import Bundle
from streamd.model.postprocess import postprocess
from streamd.model.preprocess import letterbox_batch
from streamd.types import Frame, FrameResult, Latency, ModelRef


@dataclass(frozen=True, slots=True)
class Batch:
    """Frames of one or more streams inferred together; started_at: time.time() when it was gathered."""

    frames: tuple[Frame, ...]
    started_at: float

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("a Batch needs at least one frame")


class _Done:
    """A backend output already computed (backends without an asynchronous `submit`)."""

    __slots__ = ("output",)

    def __init__(self, output: np.ndarray):
        self.output = output

    def wait(self) -> np.ndarray:
        return self.output


@dataclass(frozen=True, slots=True)
class InFlight:
    """A submitted batch: the batch, its letterbox scales, the backend's handles, and when preprocessing began."""

    batch: Batch
    scales: np.ndarray
    handles: tuple
    began: float


class BatchInferStage:
    """Batch -> FrameResult per frame (same order), with decode/queue/infer latency and the bundle's ModelRef.

    conf_threshold / iou_threshold: None takes the bundle's defaults.
    Latency: decode = the frame's decode_ms; queue = decoded_at -> batch
    gathered; infer = letterbox + backend + NMS of the whole batch; total =
    decoded_at -> result ready (the publisher sets the final total).
    """

    name = "infer"

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        conf_threshold: float | None = None,
        iou_threshold: float | None = None,
        warmup_runs: int = 2,
    ):
        self.bundle = bundle
        self.backend = backend
        defaults = bundle.meta.thresholds
        self.conf_threshold = defaults.conf_threshold if conf_threshold is None else conf_threshold
        self.iou_threshold = defaults.iou_threshold if iou_threshold is None else iou_threshold
        self.model = ModelRef(name=bundle.meta.name, sha256=bundle.sha256, class_names=bundle.meta.class_names)
        self.warmup_runs = warmup_runs

    @property
    def overlaps(self) -> bool:
        """True when the backend runs asynchronously (`submit`), so a second batch can overlap the first."""
        return hasattr(self.backend, "submit")

    def setup(self) -> None:
        """Warm the backend up at batch 1 and at max_batch, so the first real frame is not slow (before READY=1)."""
        height, width = self.bundle.meta.input_hw
        for size in sorted({1, self.backend.max_batch}):
            zeros = np.full((size, 3, height, width), self.bundle.meta.preprocess.pad_value, np.float32)
            for _ in range(self.warmup_runs):
                self.backend.infer(zeros)

    def submit(self, batch: Batch) -> InFlight:
        began = time.perf_counter()
        tensor, scales = letterbox_batch([f.image for f in batch.frames], self.bundle.meta.input_hw, self.bundle.meta.preprocess)
        submit = getattr(self.backend, "submit", None)
        handles = []
        for start in range(0, len(tensor), self.backend.max_batch):
            chunk = tensor[start : start + self.backend.max_batch]
            handles.append(submit(chunk) if submit is not None else _Done(self.backend.infer(chunk)))
        return InFlight(batch=batch, scales=scales, handles=tuple(handles), began=began)

    def finish(self, in_flight: InFlight) -> list[FrameResult]:
        outputs = [handle.wait() for handle in in_flight.handles]
        output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        frames = in_flight.batch.frames
        detections = postprocess(
            output, in_flight.scales, [(f.height, f.width) for f in frames], self.conf_threshold, self.iou_threshold
        )
        infer_ms = (time.perf_counter() - in_flight.began) * 1e3
        now = time.time()
        started_at = in_flight.batch.started_at
        return [
            FrameResult(
                frame=frame,
                detections=found,
                model=self.model,
                latency=Latency(
                    decode=frame.decode_ms,
                    queue=max(0.0, (started_at - frame.decoded_at) * 1e3),
                    infer=infer_ms,
                    total=max(0.0, (now - frame.decoded_at) * 1e3),
                ),
                batch_size=len(frames),
            )
            for frame, found in zip(frames, detections)
        ]

    def process(self, batch: Batch) -> Iterator[FrameResult]:
        yield from self.finish(self.submit(batch))

    def close(self) -> None:
        self.backend.close()
