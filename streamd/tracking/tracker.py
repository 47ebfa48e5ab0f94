"""One stream's tracker: ByteTrack (or SORT) behind our ids, confirmation and events.

The association (Kalman prediction, IoU matching, ByteTrack's second pass over low-score boxes) is roboflow
`trackers`' algorithm. For ByteTrack it runs in streamd.tracking.bytetrack, a vectorized copy of `trackers`'
ByteTrackTracker (every track's Kalman filter in one array, its matrices read from `trackers`): 0.9 ms a frame at
30 boxes with `trackers`' class against a 0.5 ms budget, most of it its per-track Kalman steps in Python; cutting
our wrapper's overhead could not reach the budget, and batching inside `trackers`' classes would have meant
deferring their estimators' updates behind a private hook. `trackers`' class stays the reference: the tests
require the same ids frame by frame, and `make_tracker(..., reference=True)` runs it. SORT is `trackers`'
SORTTracker as it is. What is ours is thin and on top:
- track ids: our own counter from 1, one per track, given in the engine's order of first match, never reused
  for the tracker's life (not even after `finish`);
- confirmation: a track is confirmed once `confirm_n` of its last `confirm_m` frames had its box at or above
  `confirm_threshold`, and stays confirmed. The score matters more than the count: most unconfirmable tracks
  in benchmarks/tracking.py are steady boxes on cells BCCD leaves unlabelled, which any N of M confirms; their
  boxes score lower (median best 0.53 against 0.67), and 2 of 3 at 0.5 halves them where N of M alone could not;
- events: "confirmed" once per track, "ended" when the engine drops the track (unseen for `max_lost_s`) or at
  `finish`.

ByteTrack gives a box an id only when a second box in the next frame matches it, so the first frame of every
object is untracked (-1) and a track's `first_pts_s` is the second frame its object was seen. Times are the
stream's pts in seconds, so the settings mean the same at 10 or 60 fps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from streamd.model.detections import Detections
from streamd.tracking.bytetrack import REFERENCE_FPS, ByteTrack

if TYPE_CHECKING:  # `trackers` and supervision take over a second to import: only a stream that tracks pays it
    from trackers import ByteTrackTracker, SORTTracker


@dataclass(frozen=True, slots=True)
class TrackSettings:
    """How one stream is tracked.

    method: "bytetrack" (two-pass association, low-score boxes keep tracks alive) or "sort".
    new_track_threshold: a box starts a track only with at least this confidence.
    high_conf_threshold: ByteTrack's first pass takes boxes at or above it, the second pass the others, which
        only extend tracks (so it may not exceed new_track_threshold; ignored by SORT).
    match_iou_threshold: the least IoU between a track's predicted box and a box for them to match.
    confirm_n / confirm_m / confirm_threshold: a track is confirmed once confirm_n of its last confirm_m frames had
        its box with at least confirm_threshold confidence (0: any box).
    max_lost_s: a track ends after this long unseen (stream seconds).
    """

    method: Literal["bytetrack", "sort"] = "bytetrack"
    new_track_threshold: float = 0.4
    high_conf_threshold: float = 0.4
    match_iou_threshold: float = 0.2
    confirm_n: int = 2
    confirm_m: int = 3
    confirm_threshold: float = 0.5
    max_lost_s: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("bytetrack", "sort"):
            raise ValueError(f"unknown tracking method {self.method!r}: use 'bytetrack' or 'sort'")
        for name in ("new_track_threshold", "high_conf_threshold", "match_iou_threshold", "confirm_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.method == "bytetrack" and self.high_conf_threshold > self.new_track_threshold:
            raise ValueError(
                f"high_conf_threshold {self.high_conf_threshold} > new_track_threshold {self.new_track_threshold}: "
                "ByteTrack starts tracks only from first pass boxes, so boxes in between would start none"
            )
        if not 1 <= self.confirm_n <= self.confirm_m:
            raise ValueError(f"need 1 <= confirm_n <= confirm_m, got {self.confirm_n} of {self.confirm_m}")
        if self.max_lost_s < 0:
            raise ValueError(f"max_lost_s must be >= 0, got {self.max_lost_s}")


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """A track confirmed or ended.

    kind: "confirmed" (sent once, at the frame that confirmed it) or "ended".
    track_id: the stream's track id. class_id: the class of its best-scoring box.
    first_pts_s / last_pts_s: the stream times of its first and last box (so far, for "confirmed").
    frames: frames it had a box in. best_score: its highest box confidence, in [0, 1].
    """

    kind: Literal["confirmed", "ended"]
    track_id: int
    class_id: int
    first_pts_s: float
    last_pts_s: float
    frames: int
    best_score: float

    @property
    def duration_s(self) -> float:
        """Seconds from the track's first box to its last."""
        return self.last_pts_s - self.first_pts_s


@dataclass(frozen=True, slots=True)
class TrackUpdate:
    """The tracker's answer for one frame.

    track_id: int64 [N], aligned with the input rows; -1 where a row got no track.
    confirmed: bool [N], whether the row's track is confirmed (False for -1 rows).
    events: the tracks confirmed or ended at this frame.
    """

    track_id: np.ndarray
    confirmed: np.ndarray
    events: tuple[TrackEvent, ...]

    def __post_init__(self) -> None:
        for name, dtype in (("track_id", np.int64), ("confirmed", np.bool_)):
            array = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            array.setflags(write=False)
            object.__setattr__(self, name, array)


@dataclass(slots=True)
class _Track:
    """A live track's bookkeeping (mutable, private to its Tracker)."""

    track_id: int
    class_id: int
    first_pts_s: float
    last_pts_s: float
    best_score: float
    window: deque[bool]  # its last confirm_m frames: a box at or above confirm_threshold; unused once confirmed
    frames: int = 0
    confirmed: bool = False

    def event(self, kind: Literal["confirmed", "ended"]) -> TrackEvent:
        return TrackEvent(kind, self.track_id, self.class_id, self.first_pts_s, self.last_pts_s, self.frames,
                          self.best_score)


class _Engine(Protocol):
    """Association and track lifetime: ids (from 0, in order of first match) for one frame's boxes."""

    def update(self, xyxy: np.ndarray, confidence: np.ndarray, pts_s: float) -> np.ndarray:
        """xyxy float32 [N, 4], confidence [N] at stream time pts_s; int64 [N]: each row's id, -1 for none."""
        ...

    @property
    def ids(self) -> np.ndarray:
        """int64 [K]: the ids of the tracks still alive."""
        ...


@dataclass(slots=True)
class TrackersEngine:
    """`trackers`' own tracker behind the engine interface: SORT, and the ByteTrack that ours is tested against."""

    tracker: ByteTrackTracker | SORTTracker

    def update(self, xyxy: np.ndarray, confidence: np.ndarray, pts_s: float) -> np.ndarray:
        import supervision as sv  # noqa: PLC0415 (see the TYPE_CHECKING import above)

        found = sv.Detections(xyxy=xyxy, confidence=confidence, data={"row": np.arange(len(xyxy))})
        tracked = self.tracker.update(found, timestamp=pts_s)
        engine_id = np.full(len(xyxy), -1, np.int64)
        if len(tracked):
            engine_id[tracked.data["row"]] = tracked.tracker_id
        return engine_id

    @property
    def ids(self) -> np.ndarray:
        return np.array([t.tracker_id for t in self.tracker.tracks if t.tracker_id != -1], np.int64)


@dataclass(slots=True)
class Tracker:
    """Tracks one stream's detections; `update` once per frame in pts order, `finish` at the stream's end.

    reference: ByteTrack by `trackers`' own ByteTrackTracker instead of ours (the same ids, 3.6 times the time at 30
        boxes: benchmarks/tracking.py).
    """

    settings: TrackSettings
    reference: bool = False
    _engine: _Engine = field(init=False)
    _tracks: dict[int, _Track] = field(init=False, default_factory=dict)  # by the engine's id
    _next_id: int = field(init=False, default=1)
    _last_pts_s: float = field(init=False, default=-np.inf)

    def __post_init__(self) -> None:
        self._engine = _make_engine(self.settings, self.reference)

    def update(self, detections: Detections, pts_s: float) -> TrackUpdate:
        """Track one frame's detections (source pixels) at stream time pts_s (s, not below the last frame's)."""
        if not pts_s >= self._last_pts_s or not np.isfinite(pts_s):
            raise ValueError(f"pts_s went back from {self._last_pts_s} to {pts_s} or is not finite: a tracker needs "
                             "finite times in stream order")
        self._last_pts_s = pts_s
        engine_id = self._engine.update(detections.xyxy, detections.confidence, pts_s)
        rows = np.flatnonzero(engine_id >= 0)
        rows = rows[np.argsort(engine_id[rows], kind="stable")]  # new tracks take our ids in the engine's order
        scores, class_ids = detections.confidence.tolist(), detections.class_id.tolist()
        seen = [(row, self._seen(engine_row_id, scores[row], class_ids[row], pts_s))
                for row, engine_row_id in zip(rows.tolist(), engine_id[rows].tolist())]
        hits = {track.track_id for row, track in seen if scores[row] >= self.settings.confirm_threshold}
        events: list[TrackEvent] = []
        for track in self._tracks.values():
            if not track.confirmed:
                track.window.append(track.track_id in hits)
                if sum(track.window) >= self.settings.confirm_n:
                    track.confirmed = True
                    events.append(track.event("confirmed"))
        track_id = np.full(len(detections), -1, np.int64)
        confirmed = np.zeros(len(detections), bool)
        for row, track in seen:
            track_id[row], confirmed[row] = track.track_id, track.confirmed
        alive = set(self._engine.ids.tolist())
        for ended in [i for i in self._tracks if i not in alive]:
            events.append(self._tracks.pop(ended).event("ended"))
        return TrackUpdate(track_id, confirmed, tuple(events))

    def finish(self, pts_s: float) -> tuple[TrackEvent, ...]:
        """End every open track (the stream ended at pts_s); the tracker starts afresh, its ids still unused."""
        self._last_pts_s = max(self._last_pts_s, pts_s)
        events = tuple(track.event("ended") for track in self._tracks.values())
        self._tracks.clear()
        self._engine = _make_engine(self.settings, self.reference)
        return events

    def _seen(self, engine_id: int, score: float, class_id: int, pts_s: float) -> _Track:
        """Start or extend the track of engine_id with a box of this score and class; the track."""
        track = self._tracks.get(engine_id)
        if track is None:
            track = _Track(self._next_id, class_id, pts_s, pts_s, score, deque(maxlen=self.settings.confirm_m))
            self._tracks[engine_id] = track
            self._next_id += 1
        track.frames += 1
        track.last_pts_s = pts_s
        if score > track.best_score:
            track.best_score, track.class_id = score, class_id
        return track


def _make_engine(settings: TrackSettings, reference: bool) -> _Engine:
    """The engine for settings: ours for ByteTrack (trackers' own if reference), trackers' for SORT; lost in s."""
    lost_track_buffer = round(settings.max_lost_s * REFERENCE_FPS)  # trackers counts it in frames at 30 fps
    if settings.method == "bytetrack" and not reference:
        return ByteTrack(settings.new_track_threshold, settings.high_conf_threshold, settings.match_iou_threshold,
                         lost_budget_s=lost_track_buffer / REFERENCE_FPS)
    from trackers import ByteTrackTracker, SORTTracker  # noqa: PLC0415 (see the TYPE_CHECKING import above)

    common = {"lost_track_buffer": lost_track_buffer, "frame_rate": REFERENCE_FPS, "minimum_consecutive_frames": 1,
              "track_activation_threshold": settings.new_track_threshold,
              "minimum_iou_threshold": settings.match_iou_threshold}
    match settings.method:
        case "bytetrack":
            return TrackersEngine(ByteTrackTracker(**common, high_conf_det_threshold=settings.high_conf_threshold))
        case "sort":
            return TrackersEngine(SORTTracker(**common))


def make_tracker(settings: TrackSettings, *, reference: bool = False) -> Tracker:
    """A tracker for one stream (reference: ByteTrack by `trackers`' own class, see Tracker)."""
    return Tracker(settings, reference)
