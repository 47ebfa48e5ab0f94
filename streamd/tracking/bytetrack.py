"""ByteTrack with every track's Kalman filter in one array: roboflow `trackers`' ByteTrackTracker, vectorized.

Why not `trackers`' own class: it keeps one Python object and one 8x8 Kalman filter per track, and its per-track
predict and update (NumPy calls on 8x8 matrices, about 20 us each) cost most of a frame: 0.9 ms at 30 boxes on
the 2-core Xeon against a 0.5 ms budget. Batching those steps behind its classes would mean a state estimator
that defers its own update to a hook of the tracker's private loop, and the objects' bookkeeping alone (run with
the Kalman algebra taken out) still cost about a third of the frame. So this is the same algorithm over arrays,
one row per track, and `trackers` stays the reference: tests/streamd/tracking/test_bytetrack.py runs both over
real detections of the shipped model and synthetic scenes and requires the same ids frame by frame. What is
still `trackers`' own here: the Kalman filter's matrices (F and Q for the step, R, H, the first P), read from a
`ByteTrackTracklet`, so its tuning and motion model stay theirs.

One frame, as `ByteTrackTracker.update(detections, timestamp=pts_s)` in trackers 2.6 with
minimum_consecutive_frames=1 (the steps are numbered in `update` below):
1. the step: elapsed seconds x 30 (`REFERENCE_FPS`), the first frame one nominal frame, a repeated pts none;
2. predict every track (x = F x, P = F P F' + Q); a track missed last frame starts its run of hits again;
3. drop tracks unseen longer than the lost budget (before matching, so that a stale track is not revived);
4. first pass: boxes at or above high_conf_threshold against every track, IoU of the predicted boxes,
   `linear_sum_assignment` for the most IoU, pairs under match_iou_threshold undone; second pass: the other
   boxes against the tracks the first left;
5. Kalman update (Joseph form) of the matched tracks; a track gets its id at its first match;
6. first-pass boxes left over at or above new_track_threshold start tracks (untracked, -1, this frame);
7. keep the tracks within the lost budget that have an id, a hit, or were matched now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from streamd.model.postprocess import iou_matrix

if TYPE_CHECKING:  # `trackers` takes a second to import: only a stream that tracks pays it
    from trackers.utils.state_representations import BaseStateEstimator

REFERENCE_FPS = 30.0  # `trackers` counts Kalman steps and its lost buffer in frames at this rate


@dataclass(frozen=True, slots=True)
class _Kalman:
    """`trackers`' ByteTrack Kalman filter (XYXY state: x1, y1, x2, y2 and their velocities), for all tracks.

    measurement_noise [4, 4], observation [4, 8], first_covariance [8, 8]: float64, as a new tracklet has them;
    identity: I [8, 8].
    `step(frame_step)` gives F and Q [8, 8] for a step of frame_step nominal frames (trackers' motion model).
    """

    measurement_noise: np.ndarray
    observation: np.ndarray
    first_covariance: np.ndarray
    identity: np.ndarray
    _estimator: BaseStateEstimator  # a new ByteTrackTracklet's (XYXY), used only for its motion model

    @classmethod
    def from_trackers(cls) -> _Kalman:
        from trackers.core.bytetrack.tracklet import ByteTrackTracklet  # noqa: PLC0415 (a second to import)

        estimator = ByteTrackTracklet(np.zeros(4)).state_estimator
        kf = estimator.kf
        return cls(kf.measurement_noise.copy(), kf.observation_mtx.copy(), kf.state_covariance.copy(),
                   np.eye(kf.dim_x), estimator)

    def step(self, frame_step: float) -> tuple[np.ndarray, np.ndarray]:
        kf = self._estimator.kf
        self._estimator.motion.apply(kf, frame_step, REFERENCE_FPS)
        return kf.transition_mtx, kf.process_noise


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU float32 [A, B] of xyxy boxes a [A, 4] and b [B, 4], computed in float64 as supervision's box_iou_batch
    (the same formula: `trackers`' ids depend on IoUs at the thresholds to the last bit)."""
    return iou_matrix(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)


def _others(count: int, taken: np.ndarray) -> np.ndarray:
    """The indices in range(count) not in `taken`, ascending."""
    free = np.ones(count, bool)
    free[taken] = False
    return np.flatnonzero(free)


def _assign(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Most-IoU one-to-one pairs (track rows ascending, box columns) at IoU >= min_iou."""
    if iou.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (0.4 s to import: only a stream that tracks pays)

    rows, cols = linear_sum_assignment(iou, maximize=True)
    good = iou[rows, cols] >= min_iou
    return rows[good], cols[good]


@dataclass(slots=True)
class ByteTrack:
    """One stream's ByteTrack; `update` once per frame, pts not going back. Ids from 0, in order of first match.

    lost_budget_s: a track unseen longer than this ends (trackers' lost_track_buffer / 30 s).
    """

    new_track_threshold: float
    high_conf_threshold: float
    match_iou_threshold: float
    lost_budget_s: float
    _kalman: _Kalman = field(init=False)
    _state: np.ndarray = field(init=False)  # float64 [T, 8]
    _covariance: np.ndarray = field(init=False)  # float64 [T, 8, 8]
    _id: np.ndarray = field(init=False)  # int64 [T], -1 before the first match
    _misses: np.ndarray = field(init=False)  # int64 [T], predicts since the last hit
    _missed_s: np.ndarray = field(init=False)  # float64 [T], seconds since the last hit
    _run: np.ndarray = field(init=False)  # int64 [T], consecutive hits
    _last_pts_s: float | None = field(init=False, default=None)
    _next_id: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._kalman = _Kalman.from_trackers()
        self._state = np.zeros((0, 8))
        self._covariance = np.zeros((0, 8, 8))
        self._id, self._misses, self._run = (np.zeros(0, np.int64) for _ in range(3))
        self._missed_s = np.zeros(0)

    @property
    def ids(self) -> np.ndarray:
        """int64 [K]: the ids of the live tracks that have one."""
        return self._id[self._id >= 0]

    def update(self, xyxy: np.ndarray, confidence: np.ndarray, pts_s: float) -> np.ndarray:
        """Track one frame's boxes xyxy [N, 4] with confidence [N]; int64 [N]: each row's track id, -1 for none."""
        frame_step, elapsed_s = self._timing(pts_s)  # 1.
        engine_id = np.full(len(xyxy), -1, np.int64)
        if len(self._id) == 0 and len(xyxy) == 0:
            return engine_id
        if frame_step > 0:  # 2.
            self._predict(frame_step, elapsed_s)
        self._keep(self._missed_s <= self.lost_budget_s)  # 3.
        predicted = self._state[:, :4]
        high = confidence >= self.high_conf_threshold  # 4.
        high_rows, low_rows = np.flatnonzero(high), np.flatnonzero(~high)
        first_tracks, first_cols = _assign(box_iou(predicted, xyxy[high_rows]), self.match_iou_threshold)
        left = _others(len(self._id), first_tracks)
        second_tracks, second_cols = _assign(box_iou(predicted[left], xyxy[low_rows]), self.match_iou_threshold)
        tracks = np.concatenate([first_tracks, left[second_tracks]])
        rows = np.concatenate([high_rows[first_cols], low_rows[second_cols]])
        self._correct(tracks, xyxy[rows])  # 5.
        new = tracks[self._id[tracks] < 0]
        self._id[new] = np.arange(self._next_id, self._next_id + len(new))
        self._next_id += len(new)
        engine_id[rows] = self._id[tracks]
        spare = _others(len(high_rows), first_cols)  # 6.
        starts = high_rows[spare][confidence[high_rows[spare]] >= self.new_track_threshold]
        self._start(xyxy[starts])
        self._keep((self._missed_s <= self.lost_budget_s) & ((self._id >= 0) | (self._run >= 1) | (self._misses == 0)))  # 7.
        return engine_id

    def _timing(self, pts_s: float) -> tuple[float, float]:
        """(Kalman step in nominal frames, elapsed s) since the last frame, as trackers' _predict_timing."""
        last, self._last_pts_s = self._last_pts_s, pts_s
        if last is None:
            elapsed_s = 1.0 / REFERENCE_FPS
        elif pts_s == last:
            return 0.0, 0.0
        else:
            elapsed_s = pts_s - last
        return elapsed_s * REFERENCE_FPS, elapsed_s

    def _predict(self, frame_step: float, elapsed_s: float) -> None:
        transition, process_noise = self._kalman.step(frame_step)
        self._state = self._state @ transition.T
        self._covariance = transition @ self._covariance @ transition.T + process_noise
        self._run[self._misses > 0] = 0
        self._misses += 1
        self._missed_s += elapsed_s

    def _correct(self, tracks: np.ndarray, xyxy: np.ndarray) -> None:
        """Kalman update of rows `tracks` with boxes xyxy [M, 4] (trackers' KalmanFilter.update, batched)."""
        h, r = self._kalman.observation, self._kalman.measurement_noise
        state, covariance = self._state[tracks], self._covariance[tracks]
        residual = xyxy.astype(np.float64) - state @ h.T
        pht = covariance @ h.T
        gain = pht @ np.linalg.inv(h @ pht + r)
        self._state[tracks] = state + (gain @ residual[:, :, None])[:, :, 0]
        i_kh = self._kalman.identity - gain @ h
        gain_t = gain.transpose(0, 2, 1)
        self._covariance[tracks] = i_kh @ covariance @ i_kh.transpose(0, 2, 1) + gain @ r @ gain_t
        self._misses[tracks] = 0
        self._missed_s[tracks] = 0.0
        self._run[tracks] += 1

    def _start(self, xyxy: np.ndarray) -> None:
        """New tracks from boxes xyxy [S, 4]: at the box, no velocity, one hit, no id yet."""
        count = len(xyxy)
        if count == 0:
            return
        state = np.zeros((count, 8))
        state[:, :4] = xyxy
        self._state = np.concatenate([self._state, state])
        self._covariance = np.concatenate([self._covariance, np.broadcast_to(self._kalman.first_covariance,
                                                                             (count, 8, 8))])
        self._id = np.concatenate([self._id, np.full(count, -1, np.int64)])
        self._misses = np.concatenate([self._misses, np.zeros(count, np.int64)])
        self._missed_s = np.concatenate([self._missed_s, np.zeros(count)])
        self._run = np.concatenate([self._run, np.ones(count, np.int64)])

    def _keep(self, keep: np.ndarray) -> None:
        if keep.all():
            return
        self._state, self._covariance, self._id = self._state[keep], self._covariance[keep], self._id[keep]
        self._misses, self._missed_s, self._run = self._misses[keep], self._missed_s[keep], self._run[keep]
