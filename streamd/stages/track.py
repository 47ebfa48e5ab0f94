"""A stream's tracker (streamd.tracking) as a stage of that stream, between inference and the stream's outputs.

FrameResult -> its track events (TrackReport, each once: confirmed, ended) then the FrameResult with the track
columns (Detections.track_id, .confirmed). At the stream's end every open track ends. Its failure is its
stream's alone (a stage of one stream): that stream's results stop until it is set up again, like any failed
stage of one stream; other streams never notice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from streamd.ops.metrics import Metrics
from streamd.tracking import TrackEvent, Tracker, TrackSettings, make_tracker
from streamd.types import EndOfStream, FrameResult, TrackReport


class TrackStage:
    """One stream's tracker; its ids are never reused for the daemon's life (set up again after a failure, it keeps
    its tracker and ends the open tracks, so new ids go on from the last one's)."""

    name = "track"

    def __init__(self, stream_id: str, settings: TrackSettings, metrics: Metrics):
        self.stream_id = stream_id
        self.settings = settings
        self.metrics = metrics
        metrics.declare({"track_events": "Tracks confirmed or ended (streamd.track/1 events)."})
        self.tracker: Tracker | None = None
        self._last_pts_s = 0.0
        self._ended: tuple[TrackEvent, ...] = ()  # tracks a failure cut short: their ended events go with the next frame

    def setup(self) -> None:
        if self.tracker is None:
            self.tracker = make_tracker(self.settings)
        else:  # set up again after a failure: its open tracks end, and say so with the next frame
            self._ended = self.tracker.finish(self._last_pts_s)

    def process(self, result: FrameResult) -> Iterator[TrackReport | FrameResult]:
        pts_s = result.frame.pts_s
        update = self.tracker.update(result.detections, pts_s)
        self._last_pts_s = pts_s
        yield from self._reports((*self._ended, *update.events))
        self._ended = ()
        yield replace(result, detections=result.detections.with_tracks(update.track_id, update.confirmed))

    def end(self, end: EndOfStream) -> Iterator[TrackReport]:
        """The stream ended: every open track ends with it."""
        if self.tracker is not None:
            yield from self._reports(self.tracker.finish(self._last_pts_s))

    def _reports(self, events) -> Iterator[TrackReport]:
        for event in events:
            self.metrics.count(self.stream_id, "track_events")
            yield TrackReport(self.stream_id, event)

    def close(self) -> None:
        pass
