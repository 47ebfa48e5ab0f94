"""A model's replay logs read back: each stream's frames (columnar boxes) and its confirmed tracks.

The logs are the daemon's own (docs/message-schema.md): a streamd.detections/3 line per frame, a
streamd.track/1 line per track event. A last line cut short (the process killed mid-write) is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.replay.errors import ReplayError


@dataclass(frozen=True, slots=True)
class FrameBoxes:
    """One frame's detections as the log has them, columnar.

    xyxy: float64 [N, 4] in source pixels; class_id: int64 [N]; score: float64 [N];
    track_id: int64 [N] (-1: no track); confirmed: bool [N] (the box belongs to a confirmed track).
    Arrays are read-only.
    """

    seq: int
    pts_s: float
    width: int
    height: int
    xyxy: np.ndarray
    class_id: np.ndarray
    score: np.ndarray
    track_id: np.ndarray
    confirmed: np.ndarray


@dataclass(frozen=True, slots=True)
class Track:
    """A confirmed track, from its last event (ended, or confirmed when the run stopped before its end)."""

    stream_id: str
    track_id: int
    class_id: int
    label: str
    first_pts_s: float
    last_pts_s: float
    frames: int
    best_score: float


@dataclass(frozen=True)
class ModelLog:
    """What one model's replay logged: frames per stream (in pts order) and its confirmed tracks per stream."""

    name: str
    frames: dict[str, tuple[FrameBoxes, ...]]
    tracks: dict[str, tuple[Track, ...]]

    @property
    def num_frames(self) -> int:
        return sum(len(f) for f in self.frames.values())


def read_model_log(name: str, folder: Path) -> ModelLog:
    """Every .jsonl log in folder (one model's replay). Raises ReplayError naming a file and line that is not
    a message of the daemon's (a complete line that is not JSON, or of an unknown schema)."""
    frames: dict[str, list[FrameBoxes]] = {}
    events: dict[tuple[str, int], dict] = {}
    confirmed: set[tuple[str, int]] = set()
    for path in sorted(folder.glob("*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        if not data.endswith(b"\n"):
            lines = lines[:-1]  # a line cut short by a kill: the lines before it are whole
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                message = json.loads(line)
                kind = message["schema"].split("/")[0]
                if kind == "streamd.detections":
                    frames.setdefault(message["stream"], []).append(_frame(message))
                elif kind == "streamd.track":
                    key = (message["stream"], message["track_id"])
                    events[key] = message
                    if message["event"] == "confirmed":
                        confirmed.add(key)
                else:
                    raise ValueError(f"schema {message['schema']!r} is not a detection or track message")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ReplayError(f"{path}:{number}: not a streamd message: {exc}") from exc
    tracks: dict[str, list[Track]] = {stream: [] for stream in frames}
    for (stream, track_id), event in sorted(events.items()):
        if (stream, track_id) in confirmed:
            tracks.setdefault(stream, []).append(Track(
                stream, track_id, event["class_id"], event["label"], event["first_pts"], event["last_pts"],
                event["frames"], event["best_score"],
            ))  # fmt: skip
    return ModelLog(
        name,
        {s: tuple(sorted(f, key=lambda b: b.pts_s)) for s, f in frames.items()},
        {s: tuple(t) for s, t in tracks.items()},
    )


def _frame(message: dict) -> FrameBoxes:
    detections = message["detections"]

    def column(key: str, dtype: type) -> np.ndarray:
        array = np.asarray([-1 if d[key] is None else d[key] for d in detections], dtype=dtype)
        array.setflags(write=False)
        return array

    return FrameBoxes(
        seq=message["seq"], pts_s=message["pts"], width=message["frame"]["width"], height=message["frame"]["height"],
        xyxy=column("box", np.float64).reshape(-1, 4), class_id=column("class_id", np.int64),
        score=column("score", np.float64), track_id=column("track_id", np.int64),
        confirmed=column("confirmed", bool),
    )  # fmt: skip
