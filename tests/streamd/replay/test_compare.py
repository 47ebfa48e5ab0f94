"""Agreement per frame and findings only one model made, on hand-made logs (no pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.replay.compare import frame_agreement, match_boxes, only_findings
from streamd.replay.logs import FrameBoxes, ModelLog, Track

BOX = [10.0, 10.0, 50.0, 50.0]
SHIFTED = [20.0, 10.0, 60.0, 50.0]  # IoU with BOX: 30x40 / (2 x 1600 - 1200) = 0.6
FAR = [200.0, 200.0, 240.0, 240.0]


def frame(seq: int, boxes: list[tuple[list[float], int]], tracks: list[int] | None = None) -> FrameBoxes:
    """A frame at 10 fps whose boxes are (xyxy, class_id); tracks: each box's track id (default none)."""
    tracks = tracks if tracks is not None else [-1] * len(boxes)
    return FrameBoxes(
        seq, seq / 10, 320, 240, np.asarray([b for b, _ in boxes], np.float64).reshape(-1, 4),
        np.asarray([c for _, c in boxes], np.int64), np.full(len(boxes), 0.9), np.asarray(tracks, np.int64),
        np.asarray([t >= 0 for t in tracks], bool),
    )  # fmt: skip


@pytest.mark.parametrize(
    "a, b, pairs",
    [
        ([(BOX, 0)], [(BOX, 0)], [(0, 0)]),
        ([(BOX, 0)], [(SHIFTED, 0)], [(0, 0)]),  # IoU 0.6
        ([(BOX, 0)], [(BOX, 1)], []),  # another class
        ([(BOX, 0)], [(FAR, 0)], []),
        ([(BOX, 0), (SHIFTED, 0)], [(SHIFTED, 0)], [(1, 0)]),  # one-to-one, the higher IoU first
        ([], [(BOX, 0)], []),
    ],
)
def test_match_boxes(a, b, pairs) -> None:
    assert match_boxes(frame(0, a), frame(0, b)).tolist() == [list(p) for p in pairs]


def test_frame_agreement_counts_matched_and_each_side_alone_on_common_frames() -> None:
    a = ModelLog("a", {"s": (frame(0, [(BOX, 0), (FAR, 1)]), frame(1, [(BOX, 0)]), frame(2, [(BOX, 0)]))}, {})
    b = ModelLog("b", {"s": (frame(0, [(SHIFTED, 0)]), frame(1, [(BOX, 0), (FAR, 0), (FAR, 2)]))}, {})
    rows = frame_agreement(a, b)
    assert [(r.seq, r.matched, r.only_a, r.only_b) for r in rows] == [(0, 1, 1, 0), (1, 1, 0, 2)]  # seq 2: b has none


def test_only_findings_are_tracks_the_other_model_never_saw_on_frames_it_processed() -> None:
    track = Track("s", 7, 0, "RBC", 0.0, 0.2, 3, 0.9)
    shared = Track("s", 8, 0, "RBC", 0.0, 0.2, 3, 0.9)
    unjudged = Track("s", 9, 0, "RBC", 0.5, 0.5, 1, 0.9)
    a = ModelLog("a", {"s": (
        frame(0, [(BOX, 0), (FAR, 0)], [7, 8]), frame(1, [(BOX, 0), (FAR, 0)], [7, 8]),
        frame(2, [(BOX, 0), (FAR, 0)], [7, 8]), frame(5, [(SHIFTED, 0)], [9]),
    )}, {"s": (track, shared, unjudged)})  # fmt: skip
    b = ModelLog("b", {"s": (
        frame(0, [(BOX, 1)]),  # the same place, another class: not seen
        frame(1, []), frame(2, [(FAR, 0)]),  # track 8 seen once: shared
    )}, {})  # fmt: skip
    findings = only_findings(a, b)
    assert [(f.model, f.track.track_id, f.best_seq, f.best_xyxy) for f in findings] == [("a", 7, 0, tuple(BOX))]
    assert only_findings(b, a) == ()
