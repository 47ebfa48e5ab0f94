"""The tracker wrapper: ids, confirmation N of M at a score, events, untracked rows and empty frames."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from streamd.config import TrackConfig
from streamd.model.detections import Detections
from streamd.tracking import TrackEvent, TrackSettings, make_tracker

FPS = 30.0
A = (10.0, 10.0, 50.0, 50.0)  # two objects far apart, 40x40 px
B = (200.0, 200.0, 240.0, 240.0)


def frame(*boxes: tuple[float, ...], score: float = 0.9, class_id: int = 0, step_px: float = 0.0) -> Detections:
    """Detections of `boxes` (xyxy), each shifted right by step_px."""
    if not boxes:
        return Detections.empty()
    xyxy = np.array(boxes, np.float32) + np.array([step_px, 0, step_px, 0], np.float32)
    return Detections(xyxy, np.full(len(boxes), score), np.full(len(boxes), class_id))


def run(settings: TrackSettings, frames: list[Detections]):
    tracker = make_tracker(settings)
    return tracker, [tracker.update(found, index / FPS) for index, found in enumerate(frames)]


def test_ids_are_stable_across_frames_and_aligned_with_rows() -> None:
    frames = [frame(A, B, step_px=2 * i) if i % 2 else frame(B, A, step_px=2 * i) for i in range(10)]
    _, updates = run(TrackSettings(), frames)
    assert updates[0].track_id.tolist() == [-1, -1]  # ByteTrack gives an id on the second sighting
    ids_of_a = [u.track_id[1] if i % 2 == 0 else u.track_id[0] for i, u in enumerate(updates[1:], 1)]
    ids_of_b = [u.track_id[0] if i % 2 == 0 else u.track_id[1] for i, u in enumerate(updates[1:], 1)]
    assert len(set(ids_of_a)) == 1 and len(set(ids_of_b)) == 1 and ids_of_a[0] != ids_of_b[0]
    assert min(ids_of_a + ids_of_b) >= 1


def test_new_ids_are_never_reused_even_after_finish() -> None:
    tracker = make_tracker(TrackSettings(max_lost_s=0.1))
    ids: list[int] = []
    pts_s = 0.0
    for box in (A, B, A):  # each object seen 3 frames, then gone for 1 s: its track ends
        for _ in range(3):
            ids += tracker.update(frame(box), pts_s).track_id.tolist()
            pts_s += 1 / FPS
        tracker.update(frame(), pts_s)
        pts_s += 1.0
    tracker.finish(pts_s)
    ids += tracker.update(frame(A), pts_s + 1).track_id.tolist() + tracker.update(frame(A), pts_s + 1.03).track_id.tolist()
    tracked = [i for i in ids if i != -1]
    assert tracked == [1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize(
    ("confirm_n", "confirm_m", "seen", "confirmed_at"),
    [
        # seen: "1" a box in that frame, "0" none. Frame 0 is the untracked first sighting, so the window starts at 1.
        (1, 1, "11111", 1),
        (3, 5, "11111", 3),
        (3, 5, "1101011", 5),  # tracked hits at 1, 3, 5: 3 of the last 5 at frame 5
        (2, 2, "11011", 4),  # hits 1 and 3 are never 2 of the last 2; 3 and 4 are
        (4, 4, "11101111", 7),  # the miss at 3 stays in the window of 4 until frame 7
    ],
)
def test_confirmation_after_n_of_the_last_m_frames(confirm_n: int, confirm_m: int, seen: str, confirmed_at: int) -> None:
    frames = [frame(A) if s == "1" else frame() for s in seen]
    _, updates = run(TrackSettings(confirm_n=confirm_n, confirm_m=confirm_m), frames)
    confirmed = [i for i, u in enumerate(updates) if u.confirmed.any()]
    events = [(i, e.kind) for i, u in enumerate(updates) for e in u.events]
    assert confirmed[0] == confirmed_at
    assert events == [(confirmed_at, "confirmed")]
    assert all(u.confirmed.all() for u in updates[confirmed_at:] if len(u.track_id))  # confirmation sticks


@pytest.mark.parametrize(
    ("scores", "confirm_threshold", "confirmed_at"),
    [
        # 2 of the last 3 frames with a box at or above confirm_threshold; frame 0 is the untracked first sighting
        ((0.9, 0.9, 0.9, 0.9), 0.5, 2),
        ((0.9, 0.45, 0.45, 0.45, 0.45, 0.45), 0.5, None),  # tracked in every frame, never confirmed
        ((0.9, 0.45, 0.6, 0.45, 0.6), 0.5, 4),  # at or above it at 2 and 4: 2 of the last 3 at frame 4
        ((0.9, 0.5, 0.5), 0.5, 2),  # at the threshold counts
        ((0.9, 0.45, 0.45, 0.45), 0.0, 2),  # 0: any box counts
    ],
)
def test_confirmation_counts_frames_with_a_box_at_or_above_confirm_threshold(
    scores: tuple[float, ...], confirm_threshold: float, confirmed_at: int | None
) -> None:
    settings = TrackSettings(confirm_n=2, confirm_m=3, confirm_threshold=confirm_threshold)
    _, updates = run(settings, [frame(A, score=score) for score in scores])
    assert all(u.track_id[0] == 1 for u in updates[1:])
    confirmed = [i for i, u in enumerate(updates) if u.confirmed.any()]
    assert (confirmed[0] if confirmed else None) == confirmed_at
    assert [i for i, u in enumerate(updates) for e in u.events if e.kind == "confirmed"] == confirmed[:1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"confirm_threshold": 0.7}, None),
        ({"confirm_threshold": 1.5}, "confirm_threshold"),
        ({"confirm_threshold": -0.1}, "confirm_threshold"),
        ({"confirm_threshold": "high"}, "confirm_threshold"),
        ({"confirm_n": 4, "confirm_m": 3}, "confirm_n <= confirm_m"),
    ],
)
def test_track_config_checks_its_fields_and_makes_the_settings(changes: dict, message: str | None) -> None:
    if message is None:
        assert TrackConfig(**changes).settings() == TrackSettings(**changes)
    else:
        with pytest.raises(pydantic.ValidationError, match=message):
            TrackConfig(**changes)


def test_ended_event_carries_duration_frames_best_score_and_class() -> None:
    scores = [0.5, 0.6, 0.95, 0.7, 0.8]
    frames = [Detections(np.array([A], np.float32), np.array([s]), np.array([2])) for s in scores] + [frame()] * 40
    tracker, updates = run(TrackSettings(confirm_n=2, confirm_m=3, max_lost_s=0.5), frames)
    ended = [(i, e) for i, u in enumerate(updates) for e in u.events if e.kind == "ended"]
    assert len(ended) == 1
    index, event = ended[0]
    # tracked from frame 1 to 4 (frame 0 untracked); ends once unseen for more than 0.5 s after frame 4
    assert event == TrackEvent("ended", 1, 2, 1 / FPS, 4 / FPS, 4, pytest.approx(0.95))
    assert event.duration_s == pytest.approx(3 / FPS)
    assert 4 + 0.5 * FPS <= index <= 4 + 0.5 * FPS + 2
    assert tracker.finish(2.0) == ()


def test_finish_ends_every_open_track() -> None:
    tracker, _ = run(TrackSettings(), [frame(A, B, step_px=i) for i in range(4)])
    events = tracker.finish(4 / FPS)
    assert sorted((e.kind, e.track_id, e.frames) for e in events) == [("ended", 1, 3), ("ended", 2, 3)]


@pytest.mark.parametrize(
    ("score", "tracked"),
    [
        (0.9, True),
        (0.41, True),  # at or above new_track_threshold 0.4: a new track
        (0.39, False),  # below it: never starts a track, its row stays -1
    ],
)
def test_rows_without_a_track_get_minus_one(score: float, tracked: bool) -> None:
    _, updates = run(TrackSettings(new_track_threshold=0.4, high_conf_threshold=0.4), [frame(A, score=score)] * 3)
    assert (updates[-1].track_id[0] != -1) == tracked
    assert not updates[-1].confirmed[0] or tracked


def test_a_low_score_box_keeps_its_track_but_starts_none() -> None:
    frames = [frame(A, score=0.9), frame(A, score=0.9), frame(A, B, score=0.2)]
    _, updates = run(TrackSettings(new_track_threshold=0.4, high_conf_threshold=0.4), frames)
    assert updates[-1].track_id.tolist() == [1, -1]


@pytest.mark.parametrize("frames", [[], [frame()], [frame(), frame(), frame()]])
def test_empty_frames(frames: list[Detections]) -> None:
    tracker, updates = run(TrackSettings(), frames)
    for update in updates:
        assert update.track_id.shape == (0,) and update.track_id.dtype == np.int64
        assert update.confirmed.shape == (0,) and update.confirmed.dtype == np.bool_
        assert update.events == ()
    assert tracker.finish(1.0) == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "deepsort"}, "unknown tracking method"),
        ({"confirm_n": 4, "confirm_m": 3}, "confirm_n <= confirm_m"),
        ({"confirm_n": 0}, "confirm_n <= confirm_m"),
        ({"match_iou_threshold": 1.5}, "match_iou_threshold"),
        ({"max_lost_s": -1.0}, "max_lost_s"),
        ({"confirm_threshold": 1.5}, "confirm_threshold"),
        ({"confirm_threshold": -0.1}, "confirm_threshold"),
        ({"new_track_threshold": 0.3, "high_conf_threshold": 0.5}, "first pass"),
    ],
)
def test_settings_refuse_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrackSettings(**changes)


def test_pts_must_not_go_back() -> None:
    tracker = make_tracker(TrackSettings())
    tracker.update(frame(A), 1.0)
    with pytest.raises(ValueError, match="went back"):
        tracker.update(frame(A), 0.5)


@pytest.mark.parametrize("method", ["bytetrack", "sort"])
def test_each_method_tracks(method: str) -> None:
    _, updates = run(TrackSettings(method=method, confirm_n=2, confirm_m=3), [frame(A, B, step_px=i) for i in range(5)])
    assert updates[-1].track_id.tolist() == [1, 2] and updates[-1].confirmed.all()
