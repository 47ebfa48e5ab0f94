"""Our vectorized ByteTrack against `trackers`' ByteTrackTracker, the reference: the same ids, frame by frame."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from trackers import ByteTrackTracker

from streamd.model.detections import Detections
from streamd.tracking import TrackSettings, make_tracker
from streamd.tracking.bytetrack import ByteTrack, box_iou
from streamd.tracking.tracker import TrackersEngine

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "models" / "bccd-nano.bundle"
BCCD = REPO.parent / "shared" / "datasets" / "BCCD"

SETTINGS = {  # (new_track_threshold, high_conf_threshold, match_iou_threshold, lost_track_buffer in 30 fps frames)
    "ours": (0.4, 0.4, 0.2, 30),
    "trackers' defaults": (0.7, 0.6, 0.1, 30),
    "short lost buffer": (0.4, 0.4, 0.2, 3),
    "wide two passes": (0.6, 0.3, 0.3, 60),
}


def engines(name: str) -> tuple[ByteTrack, TrackersEngine]:
    new, high, match_iou, buffer = SETTINGS[name]
    ours = ByteTrack(new, high, match_iou, lost_budget_s=buffer / 30.0)
    reference = ByteTrackTracker(lost_track_buffer=buffer, frame_rate=30.0, track_activation_threshold=new,
                                 minimum_consecutive_frames=1, minimum_iou_threshold=match_iou,
                                 high_conf_det_threshold=high)
    return ours, TrackersEngine(reference)


def scene(seed: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(pts_s, xyxy [N, 4] float32, confidence [N]) for 150 frames: objects that come, move, jitter and go,
    missed boxes, false boxes, crowded overlaps, dropped frames, repeated pts and empty frames, at 10-60 fps."""
    rng = np.random.default_rng(seed)
    fps = rng.choice([10.0, 30.0, 60.0])
    objects = 12
    start, end = rng.integers(0, 150, objects), rng.integers(0, 150, objects)
    corner = rng.uniform(0, 500, (objects, 2)) if seed % 2 else rng.uniform(0, 120, (objects, 2))  # odd: crowded
    size = rng.uniform(20, 80, (objects, 2))
    velocity = rng.normal(0, 4, (objects, 2)) * 30 / fps
    frames, pts_s = [], 0.0
    for index in range(150):
        pts_s += 0.0 if rng.random() < 0.03 else rng.choice([1, 1, 1, 2, 5]) / fps  # repeats, drops, a gap
        alive = (start <= index) & (index <= end) & (rng.random(objects) > 0.15)
        top_left = corner[alive] + velocity[alive] * index + rng.normal(0, 1.5, (int(alive.sum()), 2))
        boxes = np.hstack([top_left, top_left + size[alive] * rng.uniform(0.9, 1.1, (int(alive.sum()), 2))])
        false = rng.uniform(0, 500, (rng.poisson(1.0), 2))
        boxes = np.vstack([boxes, np.hstack([false, false + 30])])[rng.permutation(len(boxes) + len(false))]
        if rng.random() < 0.05:
            boxes = boxes[:0]
        frames.append((pts_s, boxes.astype(np.float32), rng.uniform(0.05, 1.0, len(boxes)).astype(np.float32)))
    return frames


@pytest.mark.filterwarnings("ignore:ByteTrackTracker. duplicate timestamp")  # the repeated pts are on purpose
@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("seed", range(12))
def test_same_ids_as_trackers_on_synthetic_scenes(name: str, seed: int) -> None:
    ours, reference = engines(name)
    for pts_s, xyxy, confidence in scene(seed):
        expected = reference.update(xyxy, confidence, pts_s)
        assert ours.update(xyxy, confidence, pts_s).tolist() == expected.tolist(), pts_s
        assert sorted(ours.ids.tolist()) == sorted(reference.ids.tolist()), pts_s


def test_the_synthetic_scenes_exercise_both_passes_and_track_ends() -> None:
    """Guards the test above against scenes too easy to tell two trackers apart."""
    ours, _ = engines("ours")
    ids, ended = [], 0
    for pts_s, xyxy, confidence in scene(1):
        before = set(ours.ids.tolist())
        found = ours.update(xyxy, confidence, pts_s)
        ids.append(found)
        ended += len(before - set(ours.ids.tolist()))
    assert ended >= 3
    low = np.concatenate([c < 0.4 for _, _, c in scene(1)])
    assert (np.concatenate(ids)[low] >= 0).sum() >= 10  # low-score boxes that the second pass kept on a track


def load_benchmark():
    spec = importlib.util.spec_from_file_location("tracking_benchmark", REPO / "benchmarks" / "tracking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_detections() -> list[tuple[np.ndarray, tuple[Detections, ...]]]:
    """The shipped model's detections on the benchmark's quick sequences cut to 2 s: (pts_s, detections)."""
    if not (BUNDLE.is_dir() and BCCD.is_dir()):
        pytest.skip("needs the shipped bundle and BCCD")
    from streamd.backends.onnxruntime import OnnxRuntimeBackend
    from streamd.detector import Detector
    from streamd.model import load_bundle

    benchmark = load_benchmark()
    strip = benchmark.load_strip(3)
    bundle = load_bundle(BUNDLE)
    detector = Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=8, intra_op_threads=0))
    sequences = benchmark.sequences(strip.image.shape[1], 2.0, quick=True)
    return [(s.pts_s, benchmark.record(detector, strip, s).detections) for s in sequences]


@pytest.mark.parametrize("name", ["ours", "trackers' defaults", "short lost buffer"])
def test_same_track_ids_and_events_as_trackers_on_the_models_detections(real_detections, name: str) -> None:
    new, high, match_iou, buffer = SETTINGS[name]
    settings = TrackSettings(new_track_threshold=new, high_conf_threshold=high, match_iou_threshold=match_iou,
                             max_lost_s=buffer / 30.0)
    tracked = 0
    for pts, detections in real_detections:
        ours, reference = make_tracker(settings), make_tracker(settings, reference=True)
        for pts_s, found in zip(pts.tolist(), detections):
            expected = reference.update(found, pts_s)
            update = ours.update(found, pts_s)
            assert update.track_id.tolist() == expected.track_id.tolist(), pts_s
            assert update.confirmed.tolist() == expected.confirmed.tolist() and update.events == expected.events
            tracked += int((update.track_id >= 0).sum())
        assert ours.finish(pts[-1]) == reference.finish(pts[-1])
    assert tracked >= 500


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([[0, 0, 10, 10]], [[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]]),
        ([[0.5, 1.25, 7.75, 3.0], [2, 2, 2, 9]], [[1, 1, 4, 4], [2, 2, 2, 9]]),  # a zero-area box: IoU 0, not NaN
        (np.random.default_rng(0).uniform(0, 50, (6, 4)).cumsum(axis=1), np.zeros((0, 4))),
    ],
)
def test_box_iou_is_supervisions_to_the_bit(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert box_iou(a, b).dtype == np.float32
    assert np.array_equal(box_iou(a, b), sv.box_iou_batch(a, b))
