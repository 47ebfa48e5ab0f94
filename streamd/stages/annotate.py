"""Annotate: draw a frame's detections (and its time) on a copy, for the recorder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from streamd.draw import draw_detections
from streamd.types import AnnotatedFrame, FrameResult


def timestamp_text(result: FrameResult) -> str:
    """"eus-1 #1234  pts 41.133 s  2026-11-22 18:00:00.123 UTC": stream, seq, source time, capture time."""
    frame = result.frame
    captured = datetime.fromtimestamp(frame.decoded_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{frame.stream_id} #{frame.seq}  pts {frame.pts_s:.3f} s  {captured} UTC"


class AnnotateStage:
    """FrameResult -> AnnotatedFrame: boxes, "label score" tags and a timestamp drawn on a copy.

    class_names: label per class id (empty: use the result's model class names).
    colors: BGR per class id, default streamd.draw.PALETTE_BGR.
    The input frame is never written (it is read-only and shared with the other outputs).
    """

    name = "annotate"

    def __init__(
        self,
        class_names: tuple[str, ...],
        draw_timestamp: bool = True,
        *,
        colors: Sequence[tuple[int, int, int]] | None = None,
    ) -> None:
        self.class_names = tuple(class_names)
        self.draw_timestamp = draw_timestamp
        self.colors = colors

    def setup(self) -> None:
        pass

    def process(self, item: FrameResult) -> Iterator[AnnotatedFrame]:
        image = draw_detections(
            item.frame.image,
            item.detections,
            self.class_names or item.model.class_names,
            colors=self.colors,
            timestamp_text=timestamp_text(item) if self.draw_timestamp else None,
        )
        yield AnnotatedFrame(result=item, image=image)

    def close(self) -> None:
        pass
