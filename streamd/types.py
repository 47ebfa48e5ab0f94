"""What crosses a queue: frozen, slotted dataclasses, arrays read-only.

Every item names the stream it belongs to (`stream_id`), so the runner can
route, count and end streams without knowing the item's type; an item of no
single stream (a Batch) has stream_id None. Every item also says which
`frames` it carries (counted when it is dropped; their credits released),
its credit `key` ((stream id, seq) for one frame's item, else None), and
whether it is a `control` item: an end of stream, a heartbeat or a track
event, which no queue ever drops and which never waits for room (a queue
holds at most a few: one per stream's end, one heartbeat a second, one per
track's start and end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from streamd.model.detections import Detections

if TYPE_CHECKING:
    from streamd.tracking import TrackEvent

PixelFormat = Literal["bgr24", "yuv420p"]
"""How a frame's pixels are laid out: "bgr24" uint8 [H, W, 3]; "yuv420p" uint8 [H * 3 / 2, W] (PyAV's
VideoFrame.to_ndarray(format="yuv420p"): the Y plane, then U and V at half size, row after row; H, W even)."""

Colorspace = Literal["bt601", "bt709", "bt2020"]


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """How an image array holds its picture: the format and, for yuv420p planes, what converting them to BGR
    needs to give what the decoder's own BGR would (swscale): the colour matrix the frame is tagged with and
    whether its samples are full range (JPEG, yuvj420p) or limited (16-235, video's usual)."""

    format: PixelFormat = "bgr24"
    colorspace: Colorspace = "bt601"
    full_range: bool = False


BGR24 = PixelLayout()


_EXPECTED = {"bgr24": "uint8 HxWx3 BGR", "yuv420p": "uint8 [H * 3 / 2, W] yuv420p planes (H, W even)"}


def image_problem(image, pixel_format: str, is_uint8: bool) -> str | None:
    """What is wrong with an image array (NumPy or torch) for pixel_format, or None: the one check of a layout."""
    shape = tuple(image.shape)
    if pixel_format == "yuv420p":
        fits = len(shape) == 2 and shape[0] % 3 == 0 and shape[1] % 2 == 0
    elif pixel_format == "bgr24":
        fits = len(shape) == 3 and shape[2] == 3
    else:
        return f"unknown pixel format {pixel_format!r} (bgr24 | yuv420p)"
    return None if fits and is_uint8 else f"expected {_EXPECTED[pixel_format]}, got {image.dtype} {shape}"


def picture_hw(image: np.ndarray, pixel_format: PixelFormat) -> tuple[int, int]:
    """The (H, W) of the picture an image array holds in pixel_format (for yuv420p, the Y plane's)."""
    if pixel_format == "yuv420p":
        return int(image.shape[0]) * 2 // 3, int(image.shape[1])
    return int(image.shape[0]), int(image.shape[1])


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame of one stream.

    image: uint8 [H, W, 3] BGR, read-only (the annotator draws on a copy); or, layout.format "yuv420p",
        the decoder's planes as they are, for a backend that converts colour on its device (its pixel_formats
        take yuv420p: streamd.backends.base) on a stream nothing draws on.
    pts_s: presentation time in seconds in the source's own time line.
    decoded_at: wall-clock time.time() when the frame left the decoder.
    decode_ms: time from the packet leaving the demuxer to the decoded frame (BGR or planes).
    fps: the source's nominal frame rate (used by recorders).
    gap_s: the outage of a live source just before this frame (seconds without a frame; 0 normally):
        its recording and log start a new segment, its message says so.
    pts_jump_s: a jump of the source's clock removed from pts_s just before this frame (0 normally).
    frozen: the picture has not changed for streams[].frozen_after_s (a frozen capture card or screen).
    source_hw: the decoded frame's (height, width) when `image` is smaller: a stream that is not recorded
        is converted and scaled for the model in one pass by the decoder (image = source scaled by `scale`),
        and never kept at full size. None: `image` is the full frame (scale 1).
    layout: how `image` holds the picture (BGR24, or yuv420p planes with their colour matrix and range).
    """

    stream_id: str
    seq: int
    pts_s: float
    image: np.ndarray
    decoded_at: float
    decode_ms: float = 0.0
    fps: float = 30.0
    gap_s: float = 0.0
    pts_jump_s: float = 0.0
    frozen: bool = False
    source_hw: tuple[int, int] | None = None
    scale: float = 1.0
    layout: PixelLayout = BGR24

    control: ClassVar[bool] = False

    def __post_init__(self) -> None:
        image = self.image
        if problem := image_problem(image, self.pixel_format, image.dtype == np.uint8):
            raise ValueError(f"stream {self.stream_id!r} frame {self.seq}: {problem}")
        image.setflags(write=False)

    @property
    def key(self) -> tuple[str, int]:
        """(stream id, seq): names this frame's credits in the queues after inference."""
        return self.stream_id, self.seq

    @property
    def frames(self) -> tuple[Frame, ...]:
        return (self,)

    @property
    def pixel_format(self) -> PixelFormat:
        return self.layout.format

    @property
    def image_hw(self) -> tuple[int, int]:
        """The picture's (H, W) as `image` holds it (for yuv420p, the Y plane's)."""
        return picture_hw(self.image, self.pixel_format)

    def age_ms(self, now: float) -> float:
        """ms from its packet leaving the demuxer to wall-clock `now` (time.time()): the decode, then the rest."""
        return self.decode_ms + max(0.0, (now - self.decoded_at) * 1e3)

    @property
    def height(self) -> int:
        """The source frame's height in pixels (the coordinate space of detections), whatever `image` holds."""
        return self.source_hw[0] if self.source_hw is not None else self.image_hw[0]

    @property
    def width(self) -> int:
        """The source frame's width in pixels."""
        return self.source_hw[1] if self.source_hw is not None else self.image_hw[1]


@dataclass(frozen=True, slots=True)
class Batch:
    """Frames of one or more streams inferred together; gathered_at: time.time() when the batch was complete."""

    frames: tuple[Frame, ...]
    gathered_at: float

    control: ClassVar[bool] = False
    key: ClassVar[None] = None

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("a Batch needs at least one frame")

    @property
    def stream_id(self) -> None:
        """A batch belongs to no single stream."""
        return None


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model made a detection: every message and log line names it."""

    name: str
    sha256: str
    class_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamState:
    """What is true of a stream over time, as its source saw it (streamd.ops.metrics keeps it; a frame's flags are
    folded in before any queue could drop the frame). Counters are cumulative since the daemon started.

    state: starting | running | frozen | stale | reconnecting | ended | failed (the heartbeat's meaning).
    outage_s: seconds without frames over the outages that ended, each from the last frame before it to the
    first after it; last_gap_s: the last one's. last_jump_s: the last clock jump removed from pts.
    """

    state: str
    frozen: bool = False
    outages: int = 0
    outage_s: float = 0.0
    last_gap_s: float = 0.0
    clock_jumps: int = 0
    last_jump_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Latency:
    """Where one frame's time went, milliseconds; one meaning each.

    decode_ms: packet out of the demuxer -> decoded frame.
    queue_ms: decoded frame -> its batch gathered (waiting in the input queue and for the batch to fill).
    infer_ms: the batch's letterbox + model + decode/NMS.
    total_ms: packet out of the demuxer -> detections ready (decode + queue + infer + hand-offs).
    """

    decode_ms: float
    queue_ms: float
    infer_ms: float
    total_ms: float

    def as_message(self) -> dict[str, float]:
        """The message's `latency_ms` object: the same four, keyed without the unit its name carries."""
        return {
            "decode": round(self.decode_ms, 3),
            "queue": round(self.queue_ms, 3),
            "infer": round(self.infer_ms, 3),
            "total": round(self.total_ms, 3),
        }


@dataclass(frozen=True, slots=True)
class FrameResult:
    """A frame with its detections in source pixels, leaving inference; the stream's own stages add to it.

    detections: in source pixels; after the stream's tracker, with its track_id and confirmed columns.
    message: the frame's detection message, encoded once by the stream's message stage (streamd.stages.message)
    after its tracker; the same bytes are published and written to the detection log. b"" until then.
    """

    frame: Frame
    detections: Detections
    model: ModelRef
    latency: Latency
    message: bytes = b""
    batch_size: int = 1

    control: ClassVar[bool] = False

    @property
    def stream_id(self) -> str:
        return self.frame.stream_id

    @property
    def key(self) -> tuple[str, int]:
        return self.frame.key

    @property
    def frames(self) -> tuple[Frame, ...]:
        return (self.frame,)

    @property
    def topic(self) -> str:
        """The ZeroMQ topic of its message: the stream id."""
        return self.frame.stream_id


HEARTBEAT_TOPIC = "_heartbeat"  # no stream id starts with "_", so no stream's subscription matches it


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The daemon's state, made by the supervisor once a second and published like a result (streamd.heartbeat/1).

    It belongs to no stream and carries no frame, so the workers pass it along without counting it.
    """

    message: bytes
    topic: str = HEARTBEAT_TOPIC

    control: ClassVar[bool] = True
    key: ClassVar[None] = None

    @property
    def stream_id(self) -> None:
        return None

    @property
    def frames(self) -> tuple[()]:
        return ()


@dataclass(frozen=True, slots=True)
class TrackReport:
    """A track of a stream was confirmed, or ended (event: a streamd.tracking.TrackEvent), on its way to the
    publisher and the detection log (streamd.track/1). message: encoded once by the stream's message stage."""

    stream_id: str
    event: TrackEvent
    message: bytes = b""

    control: ClassVar[bool] = True
    key: ClassVar[None] = None

    @property
    def topic(self) -> str:
        return self.stream_id

    @property
    def frames(self) -> tuple[()]:
        return ()


@dataclass(frozen=True, slots=True)
class AnnotatedFrame:
    """A frame result with its drawn copy, leaving the annotator for the recorder.

    image: uint8 [H, W, 3] BGR, read-only, the same size as result.frame.image
    (the annotator draws on a copy; result.frame.image stays the source pixels).
    """

    result: FrameResult
    image: np.ndarray

    control: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.image.shape != self.result.frame.image.shape or self.image.dtype != np.uint8:
            raise ValueError(
                f"stream {self.result.frame.stream_id!r} frame {self.result.frame.seq}: annotated image is "
                f"{self.image.dtype} {self.image.shape}, the frame is uint8 {self.result.frame.image.shape}"
            )
        self.image.setflags(write=False)

    @property
    def stream_id(self) -> str:
        return self.result.frame.stream_id

    @property
    def key(self) -> tuple[str, int]:
        return self.result.key

    @property
    def frames(self) -> tuple[Frame, ...]:
        return self.result.frames


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The one end-of-stream marker of a stream: sent in `finally` by its source, forwarded by every worker.

    error: why the stream ended early (its source failed, or it was cut off at shutdown); None at a normal end.
    """

    stream_id: str
    error: str | None = None

    control: ClassVar[bool] = True
    key: ClassVar[None] = None

    @property
    def frames(self) -> tuple[()]:
        return ()
