"""Two models' replays of the same sources compared: per frame, and per finding (confirmed track).

A box of A and a box of B agree when they have the same class and IoU >= IOU_THRESHOLD; each box agrees with
at most one (greedy, highest IoU first). A finding is a confirmed track; it is one model's alone when on none
of its frames the other model has a box of its class that overlaps it that much (any box of the other model,
confirmed or not: "only A" means B did not see it there at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.model.postprocess import iou_matrix
from streamd.replay.logs import FrameBoxes, ModelLog, Track

IOU_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class FrameAgreement:
    """One frame of one stream: boxes of A and B that agree (matched), and those of one model only."""

    stream_id: str
    seq: int
    pts_s: float
    matched: int
    only_a: int
    only_b: int


@dataclass(frozen=True, slots=True)
class Finding:
    """A confirmed track that only `model` made; its best box (source pixels) and the frame it is in (seq)."""

    model: str
    track: Track
    best_seq: int
    best_pts_s: float
    best_xyxy: tuple[float, float, float, float]


def match_boxes(a: FrameBoxes, b: FrameBoxes, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Pairs (row of a, row of b) that agree: same class, IoU >= iou_threshold, one-to-one, greedy by IoU.
    int64 [K, 2]."""
    if len(a.class_id) == 0 or len(b.class_id) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    iou = np.where(a.class_id[:, None] == b.class_id[None, :], iou_matrix(a.xyxy, b.xyxy), 0.0)
    rows, cols = np.nonzero(iou >= iou_threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_a, used_b, pairs = set(), set(), []
    for row, col in zip(rows[order], cols[order]):
        if row not in used_a and col not in used_b:
            used_a.add(row)
            used_b.add(col)
            pairs.append((row, col))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def frame_agreement(a: ModelLog, b: ModelLog) -> tuple[FrameAgreement, ...]:
    """Agreement on every frame both models processed (same stream, same seq), in stream then pts order."""
    rows = []
    for stream_id in sorted(set(a.frames) & set(b.frames)):
        theirs = {f.seq: f for f in b.frames[stream_id]}
        for ours in a.frames[stream_id]:
            other = theirs.get(ours.seq)
            if other is None:
                continue
            matched = len(match_boxes(ours, other))
            rows.append(FrameAgreement(
                stream_id, ours.seq, ours.pts_s, matched, len(ours.class_id) - matched, len(other.class_id) - matched,
            ))  # fmt: skip
    return tuple(rows)


def only_findings(ours: ModelLog, theirs: ModelLog) -> tuple[Finding, ...]:
    """`ours`'s confirmed tracks that `theirs` never saw (no box of the class overlapping it on any of its frames
    `theirs` processed; a track on none of them is not judged), each with its best-scoring box there."""
    findings = []
    for stream_id, tracks in sorted(ours.tracks.items()):
        their_frames = {f.seq: f for f in theirs.frames.get(stream_id, ())}
        boxes: dict[int, list[tuple[FrameBoxes, int]]] = {}
        for frame in ours.frames.get(stream_id, ()):
            for row in np.flatnonzero(frame.track_id >= 0):
                boxes.setdefault(int(frame.track_id[row]), []).append((frame, int(row)))
        for track in tracks:
            seen = [(frame, row) for frame, row in boxes.get(track.track_id, []) if frame.seq in their_frames]
            if not seen or any(
                overlaps_same_class(frame.xyxy[row], frame.class_id[row], their.xyxy, their.class_id)
                for frame, row in seen
                for their in (their_frames[frame.seq],)
            ):
                continue
            frame, row = max(seen, key=lambda item: item[0].score[item[1]])
            box = tuple(float(v) for v in frame.xyxy[row])
            findings.append(Finding(ours.name, track, frame.seq, frame.pts_s, box))
    return tuple(findings)


def overlaps_same_class(xyxy: np.ndarray, class_id: int, boxes_xyxy: np.ndarray, boxes_class_id: np.ndarray) -> bool:
    """Whether a box (xyxy [4]) overlaps any of boxes_xyxy [M, 4] of its class by IoU >= IOU_THRESHOLD."""
    same = boxes_class_id == class_id
    return bool(same.any() and (iou_matrix(xyxy[None], boxes_xyxy[same])[0] >= IOU_THRESHOLD).any())
