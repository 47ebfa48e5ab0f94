"""Tracking benchmark: BCCD test images moved with known motion, ground truth per frame, the shipped model.

    .venv/bin/python benchmarks/tracking.py [--quick] [--bundle models/bccd-nano.bundle]

Sequences (640x480, from a strip of BCCD test images side by side): pans at 10, 30 and 60 fps, a zoom, a
shake, a pan blurred, JPEG-compressed (quality 15), with a bar occluding it, and one with a 1 s freeze and
dropped frames (20% at random and a 0.5 s gap). The ground truth is the VOC boxes moved with the image, one
identity per annotated object; a box less than half in view (or half under the bar) is not scored, nor is a
detection on it. The model runs through streamd.detector.Detector on ONNX Runtime, once per frame;
each tracker setting then runs over the same detections.

Scored with trackers.eval (Roboflow's port of TrackEval: HOTA, IDF1, ID switches) on the tracked rows, and per
ground-truth object: time from its first appearance to its first confirmed detection (IoU >= 0.5), objects
confirmed, and false confirmed tracks per minute (a confirmed track whose boxes match no object in more than
half of its frames). "ids on" is the share of detections matching an object that carry a track id.
Tracker cost: ms per `Tracker.update` at 30 boxes (median of 300 frames); the cost table runs ours, `trackers`'
ByteTrackTracker (the reference) and SORT frame by frame in turn, so that the machine's load hits all alike, and
a line says whether the reference gave the same track ids as ours on every frame of every sequence.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from trackers.eval import box_iou, compute_clear_metrics, compute_hota_metrics, compute_identity_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamd.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from streamd.model import load_bundle  # noqa: E402
from streamd.model.detections import Detections  # noqa: E402
from streamd.detector import Detector  # noqa: E402
from streamd.tracking import Tracker, TrackSettings, make_tracker  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench import table  # noqa: E402

BCCD = REPO.parent / "shared" / "datasets" / "BCCD"
FRAME_HW = (480, 640)
MATCH_IOU = 0.5
MIN_VISIBLE = 0.5  # a ground-truth box less in view than this is not scored


@dataclass(frozen=True, slots=True)
class Strip:
    """BCCD test images side by side: image uint8 [480, 640 * k, 3], boxes float32 [G, 4] xyxy, ids int64 [G]."""

    image: np.ndarray
    boxes: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True, slots=True)
class Sequence:
    """Frames with ground truth. views: [F, 3] (x0, y0, scale) of each frame on the strip; pts_s [F] (s)."""

    name: str
    pan: bool
    pts_s: np.ndarray
    views: np.ndarray
    degrade: Callable[[np.ndarray, int], np.ndarray] | None = None
    occluder_x: np.ndarray | None = None  # [F] left edge of a full-height bar 120 px wide, in frame pixels


@dataclass(frozen=True, slots=True)
class Truth:
    """One frame's ground truth: scored boxes [G, 4] with ids [G], and boxes not scored [I, 4]."""

    boxes: np.ndarray
    ids: np.ndarray
    ignored: np.ndarray


def load_strip(count: int) -> Strip:
    names = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()[:count]
    images, boxes = [], []
    for index, name in enumerate(names):
        image = cv2.imread(str(BCCD / "JPEGImages" / f"{name}.jpg"))
        images.append(cv2.resize(image, FRAME_HW[::-1]))
        for box in ET.parse(BCCD / "Annotations" / f"{name}.xml").iter("bndbox"):
            xyxy = [float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append(np.array(xyxy) + [index * FRAME_HW[1], 0, index * FRAME_HW[1], 0])
    return Strip(np.hstack(images), np.array(boxes, np.float32), np.arange(len(boxes), dtype=np.int64))


def render(strip: Strip, sequence: Sequence, index: int) -> tuple[np.ndarray, Truth]:
    """Frame `index` of the sequence (uint8 HxWx3 BGR) and its ground truth in frame pixels."""
    x0, y0, scale = sequence.views[index]
    warp = np.array([[scale, 0, -scale * x0], [0, scale, -scale * y0]], np.float32)
    image = cv2.warpAffine(strip.image, warp, FRAME_HW[::-1], flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    boxes = (strip.boxes - [x0, y0, x0, y0]) * scale
    clipped = np.clip(boxes, 0, [FRAME_HW[1], FRAME_HW[0]] * 2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    if sequence.occluder_x is not None:
        left = sequence.occluder_x[index]
        image[:, int(max(left, 0)):int(max(left + 120, 0))] = 128
        overlap = np.clip(np.minimum(clipped[:, 2], left + 120) - np.maximum(clipped[:, 0], left), 0, None)
        inside = inside - overlap * (clipped[:, 3] - clipped[:, 1])
    if sequence.degrade is not None:
        image = sequence.degrade(image, index)
    visible = inside / area
    scored, ignored = visible >= MIN_VISIBLE, (visible > 0) & (visible < MIN_VISIBLE)
    return image, Truth(clipped[scored].astype(np.float32), strip.ids[scored], clipped[ignored].astype(np.float32))


def sequences(strip_width: int, seconds: float, quick: bool) -> list[Sequence]:
    """The benchmark's sequences; --quick keeps the 30 fps pan, the shake and the freeze with drops."""
    rng = np.random.default_rng(7)
    travel = strip_width - FRAME_HW[1]

    def pan(fps: float, length_s: float = seconds) -> tuple[np.ndarray, np.ndarray]:
        pts = np.arange(int(length_s * fps)) / fps
        return pts, np.stack([pts / length_s * travel, np.zeros_like(pts), np.ones_like(pts)], axis=1)

    pts30, views30 = pan(30)
    shake = views30 * [0.25, 1, 1] + np.c_[rng.normal(0, 6, (len(pts30), 2)), np.zeros(len(pts30))] + [0, 8, 0]
    zoom_scale = 1.3 + 0.3 * np.sin(2 * np.pi * pts30 / seconds)
    centre = np.array([FRAME_HW[1] * 1.5, FRAME_HW[0] / 2])
    zoom = np.c_[centre[0] - FRAME_HW[1] / 2 / zoom_scale, centre[1] - FRAME_HW[0] / 2 / zoom_scale, zoom_scale]
    # a 1 s freeze a third of the way in (the picture stops, time goes on), then 20% of frames and 0.5 s dropped
    frozen = views30.copy()
    start = len(pts30) // 3
    frozen[start:start + 30] = frozen[start]
    frozen[start + 30:, 0] = np.clip(frozen[start + 30:, 0] - frozen[start + 30, 0] + frozen[start, 0], 0, travel)
    keep = rng.random(len(pts30)) > 0.2
    keep[2 * len(pts30) // 3:2 * len(pts30) // 3 + 15] = False
    all_of_them = [
        Sequence("pan 30 fps", True, pts30, views30),
        Sequence("shake", False, pts30, shake),
        Sequence("freeze + drops", False, pts30[keep], frozen[keep]),
    ]
    if quick:
        return all_of_them
    blur = lambda image, _: cv2.GaussianBlur(image, (9, 9), 0)  # noqa: E731
    jpeg = lambda image, _: cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 15])[1], 1)  # noqa: E731
    bar = (pts30 / seconds * 1.5 % 1.0) * (FRAME_HW[1] + 120) - 120
    return all_of_them + [
        Sequence("pan 10 fps", True, *pan(10)),
        Sequence("pan 60 fps", True, *pan(60)),
        Sequence("zoom", False, pts30, zoom),
        Sequence("pan + blur", True, pts30, views30, blur),
        Sequence("pan + JPEG q15", True, pts30, views30, jpeg),
        Sequence("pan + occluder", True, pts30, views30, occluder_x=bar),
    ]


@dataclass(frozen=True, slots=True)
class Recorded:
    """A sequence's model output and ground truth, frame by frame."""

    sequence: Sequence
    detections: tuple[Detections, ...]
    truth: tuple[Truth, ...]


def record(detector: Detector, strip: Strip, sequence: Sequence, batch: int = 8) -> Recorded:
    """Run the detector over the sequence; detections on boxes that are not scored are removed."""
    found, truths = [], []
    for begin in range(0, len(sequence.pts_s), batch):
        rendered = [render(strip, sequence, i) for i in range(begin, min(begin + batch, len(sequence.pts_s)))]
        for detections, (_, truth) in zip(detector.detect([image for image, _ in rendered]), rendered):
            on_ignored = box_iou(detections.xyxy, truth.ignored).max(axis=1, initial=0) >= MATCH_IOU
            found.append(detections[~on_ignored])
            truths.append(truth)
    return Recorded(sequence, tuple(found), tuple(truths))


def matches(truth: Truth, detections: Detections) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches at IoU >= MATCH_IOU: (truth rows, detection rows)."""
    iou = box_iou(truth.boxes, detections.xyxy)
    if iou.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    good = iou[rows, cols] >= MATCH_IOU
    return rows[good], cols[good]


@dataclass(frozen=True, slots=True)
class Score:
    """One setting over some sequences: sums to pool, and the figures made from them."""

    idf1: float
    idf1_matched: float  # IDF1 over the detections that match an object only: identity, not the detector
    hota: float
    id_switches: int
    ids_on: float  # tracked share of the detections that match an object
    delays_s: tuple[float, ...]  # per object confirmed: first appearance -> first confirmed match
    objects: int
    false_tracks: int
    minutes: float


def score(recorded: Recorded, settings: TrackSettings) -> Score:
    tracker = make_tracker(settings)
    sequence = recorded.sequence
    gt_ids, hyp_ids, similarity, matched_gt, matched_hyp, matched_similarity = [], [], [], [], [], []
    matched = tracked = 0
    appeared: dict[int, float] = {}
    confirmed_at: dict[int, float] = {}
    track_frames: dict[int, list[bool]] = {}
    confirmed_tracks: set[int] = set()
    for pts_s, detections, truth in zip(sequence.pts_s, recorded.detections, recorded.truth):
        update = tracker.update(detections, float(pts_s))
        rows, cols = matches(truth, detections)
        matched += len(cols)
        tracked += int((update.track_id[cols] >= 0).sum())
        for gt_id in truth.ids:
            appeared.setdefault(int(gt_id), float(pts_s))
        for row, col in zip(rows, cols):
            if update.confirmed[col]:
                confirmed_at.setdefault(int(truth.ids[row]), float(pts_s))
        for col, track_id in enumerate(update.track_id):
            if track_id >= 0:
                track_frames.setdefault(int(track_id), []).append(col in cols)
        confirmed_tracks.update(int(i) for i in update.track_id[update.confirmed])
        has_id = update.track_id >= 0
        gt_ids.append(truth.ids)
        hyp_ids.append(update.track_id[has_id])
        similarity.append(box_iou(truth.boxes, detections.xyxy[has_id]))
        tracked_cols = cols[update.track_id[cols] >= 0]
        matched_gt.append(truth.ids[rows])
        matched_hyp.append(update.track_id[tracked_cols])
        matched_similarity.append(box_iou(truth.boxes[rows], detections.xyxy[tracked_cols]))
    identity = compute_identity_metrics(gt_ids, hyp_ids, similarity)
    return Score(
        identity["IDF1"], compute_identity_metrics(matched_gt, matched_hyp, matched_similarity)["IDF1"],
        compute_hota_metrics(gt_ids, hyp_ids, similarity)["HOTA"],
        int(compute_clear_metrics(gt_ids, hyp_ids, similarity)["IDSW"]), tracked / max(matched, 1),
        tuple(confirmed_at[i] - appeared[i] for i in confirmed_at), len(appeared),
        sum(1 for i in confirmed_tracks if np.mean(track_frames[i]) < 0.5),
        (sequence.pts_s[-1] - sequence.pts_s[0] + 1 / 30) / 60,
    )


def pooled(scores: list[Score], recorded: list[Recorded]) -> dict[str, float]:
    """Figures over several sequences: IDF1/HOTA/ids-on weighted by frames, the rest summed or pooled."""
    frames = np.array([len(r.sequence.pts_s) for r in recorded], float)
    delays = np.concatenate([s.delays_s for s in scores] or [np.zeros(0)])
    return {
        "idf1": float(np.average([s.idf1 for s in scores], weights=frames)),
        "idf1_matched": float(np.average([s.idf1_matched for s in scores], weights=frames)),
        "hota": float(np.average([s.hota for s in scores], weights=frames)),
        "id_switches": sum(s.id_switches for s in scores),
        "ids_on": float(np.average([s.ids_on for s in scores], weights=frames)),
        "delay_p50_s": float(np.median(delays)) if len(delays) else float("nan"),
        "delay_p90_s": float(np.percentile(delays, 90)) if len(delays) else float("nan"),
        "confirmed": len(delays) / max(sum(s.objects for s in scores), 1),
        "false_per_min": sum(s.false_tracks for s in scores) / sum(s.minutes for s in scores),
    }


def cost_ms(trackers: dict[str, Tracker], boxes: int = 30, frames: int = 300) -> dict[str, float]:
    """Median ms of one Tracker.update of each tracker, in turn each frame, over `frames` frames of `boxes` boxes
    40 px wide moving 2 px a frame."""
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 1200, (boxes, 2))
    xyxy = np.hstack([corners, corners + 40]).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in trackers}
    for index in range(frames):
        detections = Detections(xyxy + 2 * index, rng.uniform(0.3, 0.95, boxes), np.zeros(boxes))
        for name, tracker in trackers.items():
            started = time.perf_counter()
            tracker.update(detections, index / 30)
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(spent) * 1e3) for name, spent in times.items()}


def same_ids_as_reference(recorded: list[Recorded], settings: TrackSettings) -> tuple[int, int]:
    """(frames, frames where `trackers`' own ByteTrackTracker gave other track ids than ours) over the sequences."""
    frames = differ = 0
    for one in recorded:
        ours, reference = make_tracker(settings), make_tracker(settings, reference=True)
        for pts_s, detections in zip(one.sequence.pts_s.tolist(), one.detections):
            frames += 1
            differ += ours.update(detections, pts_s).track_id.tolist() != reference.update(detections, pts_s).track_id.tolist()
    return frames, differ


def confirmation(settings: TrackSettings) -> str:
    """How settings confirm, in words: "confirm 2 of 3 at 0.5"."""
    if settings.confirm_n == settings.confirm_m == 1 and settings.confirm_threshold == 0:
        return "no confirmation"
    at = f" at {settings.confirm_threshold:g}" if settings.confirm_threshold else ""
    return f"confirm {settings.confirm_n} of {settings.confirm_m}{at}"


def settings_rows(quick: bool) -> list[tuple[str, TrackSettings]]:
    """Named settings: trackers' own defaults, ours without and with confirmation, other N of M and scores."""
    ours = TrackSettings()
    none = replace(ours, confirm_n=1, confirm_m=1, confirm_threshold=0.0)
    rows = [
        ("ByteTrack, trackers' thresholds (0.7/0.6), no confirmation",
         replace(none, new_track_threshold=0.7, high_conf_threshold=0.6, match_iou_threshold=0.1)),
        ("ByteTrack, ours, no confirmation", none),
        (f"ByteTrack, ours, {confirmation(ours)} (default)", ours),
    ]
    if not quick:
        others = [(2, 3, 0.0), (3, 5, 0.0), (8, 12, 0.0), (1, 1, 0.5), (1, 1, 0.55), (2, 3, 0.45), (2, 3, 0.55),
                  (3, 5, 0.5)]
        rows += [(f"ByteTrack, ours, {confirmation(other)}", other) for other in
                 (replace(ours, confirm_n=n, confirm_m=m, confirm_threshold=at) for n, m, at in others) if other != ours]
        rows += [("SORT, ours, no confirmation", replace(none, method="sort"))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "bccd-nano.bundle")
    parser.add_argument("--quick", action="store_true", help="3 sequences of 4 s over 3 images (a test runs this)")
    args = parser.parse_args()

    strip = load_strip(3 if args.quick else 6)
    seconds = 4.0 if args.quick else 10.0
    bundle = load_bundle(args.bundle)
    detector = Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=8, intra_op_threads=0))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; bundle {bundle.meta.name}", flush=True)
    recorded = [record(detector, strip, sequence) for sequence in sequences(strip.image.shape[1], seconds, args.quick)]
    boxes = np.mean([len(d) for r in recorded for d in r.detections])
    print(f"{len(recorded)} sequences, {sum(len(r.detections) for r in recorded)} frames, {boxes:.1f} boxes a frame",
          flush=True)
    pans = [r for r in recorded if r.sequence.pan]
    rows = []
    for name, settings in settings_rows(args.quick):
        scores = [score(r, settings) for r in recorded]
        on_pans, overall = pooled([s for s, r in zip(scores, recorded) if r.sequence.pan], pans), pooled(scores, recorded)
        rows.append((name, f"{on_pans['idf1_matched']:.3f}", f"{on_pans['ids_on']:.0%}", f"{on_pans['idf1']:.3f}",
                     f"{overall['idf1_matched']:.3f}", f"{overall['idf1']:.3f}",
                     f"{overall['hota']:.3f}", str(overall["id_switches"]), f"{overall['delay_p50_s']:.2f}",
                     f"{overall['delay_p90_s']:.2f}", f"{overall['confirmed']:.0%}", f"{overall['false_per_min']:.1f}",
                     f"{cost_ms({name: make_tracker(settings)})[name]:.2f}"))
    print("\nSettings over the pans and over all sequences (IDF1 m: on the detections that match an object):")
    table(rows, ("setting", "IDF1 m pans", "ids on pans", "IDF1 pans", "IDF1 m", "IDF1", "HOTA", "ID sw", "to confirm p50 s", "p90 s", "objects confirmed",
           "false confirmed /min", "ms/frame @30"))
    print("\nThe default, per sequence:")
    table([(r.sequence.name, str(len(r.detections)), f"{s.idf1_matched:.3f}", f"{s.idf1:.3f}", f"{s.hota:.3f}", str(s.id_switches),
            f"{s.ids_on:.0%}", f"{s.false_tracks / s.minutes:.1f}")
           for r in recorded for s in [score(r, TrackSettings())]],
          ("sequence", "frames", "IDF1 m", "IDF1", "HOTA", "ID sw", "ids on", "false confirmed /min"))
    ours = TrackSettings()
    costs = cost_ms({"ByteTrack, ours (streamd.tracking.bytetrack)": make_tracker(ours),
                     "ByteTrack, trackers' ByteTrackTracker (the reference)": make_tracker(ours, reference=True),
                     "SORT, trackers' SORTTracker": make_tracker(replace(ours, method="sort"))})
    first = next(iter(costs.values()))
    print("\nTracker cost at 30 boxes, the trackers in turn each frame:")
    table([(name, f"{ms:.2f}", f"{ms / first:.2f}") for name, ms in costs.items()],
          ("tracker", "ms per Tracker.update (median of 300)", "x ours"))
    frames, differ = same_ids_as_reference(recorded, ours)
    print(f"\ntrackers' ByteTrackTracker against ours: other track ids in {differ} of {frames} frames")


if __name__ == "__main__":
    main()
