"""Annotate: draw a frame's detections, its time and the AI state on a copy, for the recorder.

The marker top-right says whether the drawing is current: "AI active" (green)
when the frame's detections were ready within the stream's max_age_ms of its
capture, "AI stale" (red) otherwise, and then the boxes are not drawn: a
stale detection is never drawn over newer anatomy. Live endoscopy detectors
show such a state; the annotation delay is what regulators ask to be measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from streamd.draw import draw_detections
from streamd.model.detections import Detections
from streamd.types import AnnotatedFrame, FrameResult, TrackReport


def timestamp_text(result: FrameResult) -> str:
    """"eus-1 #1234  pts 41.133 s  2026-11-22 18:00:00.123 UTC": stream, seq, source time, capture time."""
    frame = result.frame
    captured = datetime.fromtimestamp(frame.decoded_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{frame.stream_id} #{frame.seq}  pts {frame.pts_s:.3f} s  {captured} UTC"


AI_ACTIVE = ("AI active", (60, 160, 40))  # BGR green
AI_STALE = ("AI stale", (40, 40, 200))  # BGR red


class AnnotateStage:
    """FrameResult -> AnnotatedFrame: boxes, "label score" tags, a timestamp and the AI state drawn on a copy.

    class_names: label per class id (empty: use the result's model class names).
    colors: BGR per class id, default streamd.draw.PALETTE_BGR.
    max_age_ms: the stream's stale budget (None: no marker, boxes always drawn: a file read at full speed).
    The input frame is never written (it is read-only and shared with the other outputs).
    """

    name = "annotate"

    def __init__(
        self,
        class_names: tuple[str, ...],
        draw_timestamp: bool = True,
        *,
        colors: Sequence[tuple[int, int, int]] | None = None,
        max_age_ms: float | None = None,
    ) -> None:
        self.class_names = tuple(class_names)
        self.draw_timestamp = draw_timestamp
        self.colors = colors
        self.max_age_ms = max_age_ms

    def setup(self) -> None:
        pass

    def process(self, item: FrameResult | TrackReport) -> Iterator[AnnotatedFrame]:
        if isinstance(item, TrackReport):  # nothing to draw: a track event is for the log and the subscribers
            return
        status, detections = None, item.detections
        if self.max_age_ms is not None:
            stale = item.latency.total_ms > self.max_age_ms
            status, detections = (AI_STALE, Detections.empty()) if stale else (AI_ACTIVE, detections)
        image = draw_detections(
            item.frame.image,
            detections,
            self.class_names or item.model.class_names,
            colors=self.colors,
            timestamp_text=timestamp_text(item) if self.draw_timestamp else None,
            status=status,
        )
        yield AnnotatedFrame(result=item, image=image)

    def close(self) -> None:
        pass
