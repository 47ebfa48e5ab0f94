"""What crosses a queue: frozen, slotted dataclasses, arrays read-only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamd.model.detections import Detections


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame of one stream.

    image: uint8 [H, W, 3] BGR, read-only (the annotator draws on a copy).
    pts_s: presentation time in seconds in the source's own time line.
    decoded_at: wall-clock time.time() when the frame left the decoder.
    decode_ms: time spent demuxing and decoding this frame.
    fps: the source's nominal frame rate (used by recorders).
    """

    stream_id: str
    seq: int
    pts_s: float
    image: np.ndarray
    decoded_at: float
    decode_ms: float = 0.0
    fps: float = 30.0

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"stream {self.stream_id!r} frame {self.seq}: expected uint8 HxWx3 BGR, "
                f"got {self.image.dtype} {self.image.shape}"
            )
        self.image.setflags(write=False)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model made a detection: every message and log line names it."""

    name: str
    sha256: str
    class_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Latency:
    """Per-stage latency of one frame, milliseconds."""

    decode: float
    queue: float
    infer: float
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 3) for k in ("decode", "queue", "infer", "total")}


@dataclass(frozen=True, slots=True)
class FrameResult:
    """A frame with its detections in source pixels, leaving inference."""

    frame: Frame
    detections: Detections
    model: ModelRef
    latency: Latency
    batch_size: int = 1


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The one end-of-stream marker: forwarded by every stage, sent in `finally`.

    stream_id None means the whole pipeline ends; error is set when a stage failed.
    """

    stream_id: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AnnotatedFrame:
    """A frame result with its drawn copy, leaving the annotator for the recorder.

    image: uint8 [H, W, 3] BGR, read-only, the same size as result.frame.image
    (the annotator draws on a copy; result.frame.image stays the source pixels).
    """

    result: FrameResult
    image: np.ndarray

    def __post_init__(self) -> None:
        if self.image.shape != self.result.frame.image.shape or self.image.dtype != np.uint8:
            raise ValueError(
                f"stream {self.result.frame.stream_id!r} frame {self.result.frame.seq}: annotated image is "
                f"{self.image.dtype} {self.image.shape}, the frame is uint8 {self.result.frame.image.shape}"
            )
        self.image.setflags(write=False)
