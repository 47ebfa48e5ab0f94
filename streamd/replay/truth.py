"""Ground truth for a replay, and each model's figures against it: AP50 over frames, and the clinical figures.

The format (one JSON object per line, one line per annotated frame; frames without a line are not judged):

    {"pts": 1.5, "stream": "procedure-7", "boxes": [{"label": "WBC", "box": [x1, y1, x2, y2], "object": 3}]}

- pts: the frame's time in seconds, as the detection log gives it (the source's own pts); a line is the log
  frame whose pts is within PTS_TOLERANCE_S of it.
- stream: the replayed source's stream id (its file name, see `streamd replay`); may be left out when one
  source is replayed.
- boxes: every object in the frame (an empty list: a frame with nothing in it); label: one of the model's
  classes; box: source pixels, x1 < x2, y1 < y2; object: the object's id, the same on every frame it is in (so
  its first appearance is known).

The clinical figures per model:
- time to detection: for each object, from its first annotated frame to the first annotated frame where a box
  of a confirmed track of its class overlaps it (IoU >= 0.5); objects never found are counted as missed;
- false alarms per minute: confirmed tracks none of whose boxes on annotated frames overlaps a truth box of its
  class, per minute of annotated video (tracks on no annotated frame are not judged).

Convert a trainer dataset split (VOC or COCO) shown as a video, each image for a while, like `make demo`'s:
    python -m streamd.replay.truth configs/trainer/bccd-nano.yaml --split test --images 20 \
        --seconds-per-image 1 --fps 30 --size 640x480 -o demo-out/bccd-test.truth.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.model.detections import Detections
from streamd.replay.compare import IOU_THRESHOLD, overlaps_same_class
from streamd.replay.errors import TruthError
from streamd.replay.logs import FrameBoxes, ModelLog
from trainer.datasets.records import DatasetSplit, ImageRecord, did_you_mean
from trainer.metrics import average_precision, pr_curve

PTS_TOLERANCE_S = 0.001


@dataclass(frozen=True, slots=True)
class TruthFrame:
    """One annotated frame. xyxy: float64 [N, 4] source pixels; class_id: int64 [N]; object_id: int64 [N]."""

    stream_id: str | None
    pts_s: float
    xyxy: np.ndarray
    class_id: np.ndarray
    object_id: np.ndarray


def read_truth(path: Path, class_names: tuple[str, ...]) -> tuple[TruthFrame, ...]:
    """Every line of a truth file. Raises TruthError naming the file, the line and the field at fault."""
    frames = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TruthError(f"{path}: cannot read the truth file: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            frames.append(_truth_line(line, f"{path}:{number}", class_names))
    if not frames:
        raise TruthError(f"{path}: no annotated frame")
    return tuple(frames)


def _truth_line(line: str, where: str, class_names: tuple[str, ...]) -> TruthFrame:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise TruthError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise TruthError(f"{where}: a line is an object with pts and boxes")
    pts = record.get("pts")
    if isinstance(pts, bool) or not isinstance(pts, (int, float)) or not math.isfinite(pts):
        raise TruthError(f"{where}: pts: a number of seconds, got {pts!r}")
    stream = record.get("stream")
    if stream is not None and not isinstance(stream, str):
        raise TruthError(f"{where}: stream: a stream id (text), got {stream!r}")
    boxes = record.get("boxes")
    if not isinstance(boxes, list):
        raise TruthError(f"{where}: boxes: a list (empty for a frame with nothing in it), got {boxes!r}")
    xyxy, class_id, object_id = [], [], []
    for i, box in enumerate(boxes):
        field = f"{where}: boxes[{i}]"
        if not isinstance(box, dict):
            raise TruthError(f"{field}: an object with label, box and object")
        label, corners, obj = box.get("label"), box.get("box"), box.get("object")
        if label not in class_names:
            raise TruthError(f"{field}.label: {label!r} is not one of the model's classes "
                             f"({', '.join(class_names)}){did_you_mean(str(label), class_names)}")
        if (not isinstance(corners, list) or len(corners) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in corners)
                or not corners[0] < corners[2] or not corners[1] < corners[3]):  # fmt: skip
            raise TruthError(f"{field}.box: [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2, got {corners!r}")
        if isinstance(obj, bool) or not isinstance(obj, int):
            raise TruthError(f"{field}.object: the object's id (an integer), got {obj!r}")
        xyxy.append(corners)
        class_id.append(class_names.index(label))
        object_id.append(obj)
    return TruthFrame(
        stream, float(pts), np.asarray(xyxy, np.float64).reshape(-1, 4), np.asarray(class_id, np.int64),
        np.asarray(object_id, np.int64),
    )  # fmt: skip


def judged_frames(truth: tuple[TruthFrame, ...], log: ModelLog) -> list[tuple[TruthFrame, FrameBoxes]]:
    """Each truth frame with the log frame it annotates (same stream, pts within PTS_TOLERANCE_S), in stream and
    pts order; truth lines of frames the model did not process are left out.

    Raises TruthError when a line names no stream and more than one stream was replayed, or names an unknown one.
    """
    streams = sorted(log.frames)
    pairs = []
    for frame in truth:
        stream = frame.stream_id
        if stream is None:
            if len(streams) > 1:
                raise TruthError(f"a truth line at pts {frame.pts_s} names no stream, and {len(streams)} were "
                                 f"replayed ({', '.join(streams)}): give each line its stream")
            stream = streams[0] if streams else None
        if stream not in log.frames:
            raise TruthError(f"a truth line at pts {frame.pts_s} names stream {stream!r}, which was not replayed "
                             f"({', '.join(streams)})")
        logged = log.frames[stream]
        times = np.asarray([f.pts_s for f in logged])
        i = int(np.searchsorted(times, frame.pts_s))
        near = [j for j in (i - 1, i) if 0 <= j < len(logged) and abs(times[j] - frame.pts_s) <= PTS_TOLERANCE_S]
        if near:
            pairs.append((frame, logged[near[0]]))
    return sorted(pairs, key=lambda pair: (pair[1].pts_s, pair[0].stream_id or ""))


def truth_figures(truth: tuple[TruthFrame, ...], log: ModelLog, class_names: tuple[str, ...]) -> dict:
    """AP50 per class and its mean (VOC, area under the envelope, trainer.metrics), time to detection and
    false alarms per minute for one model's log."""
    pairs = judged_frames(truth, log)
    records = tuple(
        ImageRecord(f"{t.stream_id}@{t.pts_s}", Path(log.name), f.width, f.height, t.xyxy, t.class_id,
                    np.zeros(len(t.class_id), bool))
        for t, f in pairs
    )  # fmt: skip
    split = DatasetSplit("truth", "replay", class_names, records)
    predictions = [Detections(f.xyxy, f.score, f.class_id) for _, f in pairs]
    ap50 = {}
    for class_id, name in enumerate(class_names):
        curve = pr_curve(split, predictions, class_id, IOU_THRESHOLD)
        ap50[name] = None if curve.num_gt == 0 else average_precision(curve)
    scored = [v for v in ap50.values() if v is not None]
    delays, missed = _time_to_detection(pairs)
    false_alarms, judged = _false_alarms(pairs, log)
    minutes = _annotated_minutes(pairs)
    return {
        "frames_judged": len(pairs),
        "ap50": ap50,
        "map50": float(np.mean(scored)) if scored else None,
        "objects": len(delays) + missed,
        "objects_found": len(delays),
        "objects_missed": missed,
        "time_to_detection_s": _stats(delays),
        "tracks_judged": judged,
        "false_alarms": false_alarms,
        "annotated_minutes": round(minutes, 4),
        "false_alarms_per_min": round(false_alarms / minutes, 4) if minutes > 0 else None,
    }


def _time_to_detection(pairs: list[tuple[TruthFrame, FrameBoxes]]) -> tuple[list[float], int]:
    """Seconds from each object's first annotated frame to its first confirmed detection; and the objects missed."""
    first_seen: dict[tuple[str | None, int], float] = {}
    found: dict[tuple[str | None, int], float] = {}
    for truth, frame in pairs:
        shown_xyxy, shown_class_id = frame.xyxy[frame.confirmed], frame.class_id[frame.confirmed]
        for xyxy, class_id, obj in zip(truth.xyxy, truth.class_id, truth.object_id):
            key = (truth.stream_id, int(obj))
            first_seen.setdefault(key, frame.pts_s)
            if key not in found and overlaps_same_class(xyxy, class_id, shown_xyxy, shown_class_id):
                found[key] = frame.pts_s
    return [found[k] - first_seen[k] for k in first_seen if k in found], sum(k not in found for k in first_seen)


def track_verdicts(pairs: list[tuple[TruthFrame, FrameBoxes]], log: ModelLog) -> dict[tuple[str, int], bool]:
    """Per confirmed track on an annotated frame, (stream, track id): whether any of its confirmed boxes there
    overlaps a truth box of its class (IoU >= 0.5). Tracks on no annotated frame are left out (not judged)."""
    verdicts: dict[tuple[str, int], bool] = {}
    stream_of = {id(f): s for s, frames in log.frames.items() for f in frames}
    for truth, frame in pairs:
        stream = stream_of[id(frame)]
        for row in np.flatnonzero(frame.confirmed & (frame.track_id >= 0)):
            key = (stream, int(frame.track_id[row]))
            hit = overlaps_same_class(frame.xyxy[row], frame.class_id[row], truth.xyxy, truth.class_id)
            verdicts[key] = verdicts.get(key, False) or hit
    return verdicts


def _false_alarms(pairs: list[tuple[TruthFrame, FrameBoxes]], log: ModelLog) -> tuple[int, int]:
    """(confirmed tracks that never overlap a truth box of their class on an annotated frame, tracks judged)."""
    verdicts = track_verdicts(pairs, log)
    return sum(not hit for hit in verdicts.values()), len(verdicts)


def _annotated_minutes(pairs: list[tuple[TruthFrame, FrameBoxes]]) -> float:
    """Minutes of video the truth covers: per stream, its first to its last annotated frame plus one frame."""
    by_stream: dict[str | None, list[float]] = {}
    for truth, frame in pairs:
        by_stream.setdefault(truth.stream_id, []).append(frame.pts_s)
    total_s = 0.0
    for times in by_stream.values():
        step = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
        total_s += times[-1] - times[0] + step
    return total_s / 60.0


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "max": None}
    return {k: round(float(f(values)), 6) for k, f in (("mean", np.mean), ("median", np.median), ("max", np.max))}


def truth_from_split(
    split: DatasetSplit, *, images: int, seconds_per_image: float, fps: float, size_wh: tuple[int, int]
) -> list[dict]:
    """Truth lines for a video made of a split's first `images` images, each shown seconds_per_image at fps,
    scaled (stretched) to size_wh, as `make demo` makes demo-out/bccd-test.mp4. Object ids: image index x 1000
    + box index (an image's boxes are new objects when it appears)."""
    records = split.records[:images]
    per_image = round(seconds_per_image * fps)
    lines = []
    for k in range(len(records) * per_image):
        index = k // per_image
        record = records[index]
        scale = np.array([size_wh[0] / record.width, size_wh[1] / record.height] * 2)
        lines.append({
            "pts": round(k / fps, 6),
            "boxes": [
                {"label": split.class_names[int(c)], "box": [round(float(v), 1) for v in xyxy * scale],
                 "object": index * 1000 + i}
                for i, (xyxy, c) in enumerate(zip(record.xyxy, record.class_id))
            ],
        })  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    """python -m streamd.replay.truth EXPERIMENT --split S --images N --seconds-per-image S --fps F --size WxH -o OUT"""
    from trainer.config import load_experiment
    from trainer.datasets import load_split

    parser = argparse.ArgumentParser(prog="python -m streamd.replay.truth", description=main.__doc__)
    parser.add_argument("experiment", type=Path, help="The trainer experiment YAML naming the dataset.")
    parser.add_argument("--split", default="test", help="The split shown in the video (train, val, test).")
    parser.add_argument("--images", type=int, required=True, help="How many of its first images the video shows.")
    parser.add_argument("--seconds-per-image", type=float, required=True, help="How long each image is shown, s.")
    parser.add_argument("--fps", type=float, required=True, help="The video's frame rate.")
    parser.add_argument("--size", required=True, help="The video's WIDTHxHEIGHT (images are stretched to it).")
    parser.add_argument("-o", "--out", type=Path, required=True, help="The truth file to write (JSON lines).")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    split = load_split(load_experiment(args.experiment), args.split)
    lines = truth_from_split(split, images=args.images, seconds_per_image=args.seconds_per_image, fps=args.fps,
                             size_wh=(width, height))  # fmt: skip
    args.out.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
    print(f"{args.out}: {len(lines)} frames, {sum(len(line['boxes']) for line in lines)} boxes")


if __name__ == "__main__":
    main()
