"""The one small interface every inference backend implements: submit a batch, wait for its output.

Asynchronous backends (TensorRT, torch on CUDA) return from `submit` at once
and compute while the caller prepares the next batch; a synchronous backend
(ONNX Runtime on the CPU) computes inside `submit` and returns a `Ready`
handle. Callers have one code path for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from streamd.model.detections import Detections
from streamd.types import PixelLayout


class Pending(Protocol):
    """A submitted batch. wait() blocks until its output is on the host: float32 [N, A, 5 + C]."""

    def wait(self) -> np.ndarray: ...


class Backend(Protocol):
    """Runs a bundle's model on a batch.

    submit: float32 [N, 3, H, W] letterboxed batch (N <= max_batch) -> a Pending whose
    wait() gives float32 [N, A, 5 + C] (cx, cy, w, h in input pixels, objectness, class scores).
    """

    name: str
    max_batch: int

    def submit(self, batch: np.ndarray) -> Pending: ...

    def close(self) -> None: ...


class PendingDetections(Protocol):
    """Frames submitted to a FrameBackend. wait() blocks until their detections are on the host."""

    def wait(self) -> list[Detections]: ...


@runtime_checkable
class FrameBackend(Protocol):
    """A Backend that also takes frames as decoded and does the rest on its device (the GPU path).

    submit_frames: up to max_batch uint8 frames laid out as `layouts` say -> a PendingDetections whose wait()
    gives one Detections per frame, in source pixels: the upload, colour conversion, letterbox, model,
    score threshold and class-aware NMS all run on the device, and only the kept boxes come back.
    prescales: each image is its source scaled by this (1.0: the image is the source); boxes are divided
    by it. source_hw: each source's (H, W), to clip boxes to.
    """

    name: str
    max_batch: int

    def submit(self, batch: np.ndarray) -> Pending: ...

    def submit_frames(
        self,
        images: Sequence[np.ndarray],
        layouts: Sequence[PixelLayout],
        prescales: Sequence[float],
        source_hw: Sequence[tuple[int, int]],
        conf_threshold: float,
        iou_threshold: float,
    ) -> PendingDetections: ...

    def close(self) -> None: ...


class Ready:
    """The Pending (or PendingDetections) of a synchronous call: the result was computed inside submit()."""

    __slots__ = ("output",)

    def __init__(self, output):
        self.output = output

    def wait(self):
        return self.output


class FunctionBackend:
    """A synchronous backend around a function float32 [N, 3, H, W] -> float32 [N, A, 5 + C] (the trainer's torch model)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 8, name: str = "function"):
        self.run = run
        self.max_batch = max_batch
        self.name = name

    def submit(self, batch: np.ndarray) -> Ready:
        return Ready(self.run(batch))

    def close(self) -> None:
        pass
