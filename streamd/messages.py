"""The messages (DESIGN contract 2): one versioned type each, one encoder, each built once.

A frame's detection message (streamd.detections/3) and a track event
(streamd.track/1) are encoded once, by the stream's message stage after its
tracker (streamd.stages.message), and carried as bytes: the ZeroMQ publisher
sends them and the detection log writes them as one line, so both carry the
same bytes and the model's sha256. The heartbeat (streamd.heartbeat/2) is
made once a second by its ticker.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import cache
from importlib import resources

from streamd.model.detections import Detections
from streamd.tracking import TrackEvent
from streamd.types import Frame, Latency, ModelRef, StreamState

SCHEMA_ID = "streamd.detections/3"
TRACK_SCHEMA_ID = "streamd.track/1"
HEARTBEAT_SCHEMA_ID = "streamd.heartbeat/2"
# Every version ever published, for subscribers that meet an older daemon: id -> schema file.
SCHEMA_FILES = {
    "streamd.detections/1": "detections.v1.json",
    "streamd.detections/2": "detections.v2.json",
    SCHEMA_ID: "detections.v3.json",
    TRACK_SCHEMA_ID: "track.v1.json",
    "streamd.heartbeat/1": "heartbeat.v1.json",
    HEARTBEAT_SCHEMA_ID: "heartbeat.v2.json",
}


def iso_utc(wall_clock_s: float) -> str:
    """2026-11-22T18:00:00.123456Z from a time.time() value."""
    return datetime.fromtimestamp(wall_clock_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def label_of(class_id: int, class_names: tuple[str, ...]) -> str:
    """A class id's name (its number as text when the bundle has no such class)."""
    return class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)


def detection_records(detections: Detections, class_names: tuple[str, ...]) -> list[dict]:
    """The detections as the message's objects (box rounded to 0.1 px). Without track columns (no tracker), every
    box is confirmed and has no track."""
    tracks = detections.track_id
    confirmed = detections.confirmed
    return [
        {
            "label": label_of(int(c), class_names),
            "class_id": int(c),
            "score": round(float(s), 4),
            "box": [round(float(v), 1) for v in box],
            "track_id": None if tracks is None or tracks[i] < 0 else int(tracks[i]),
            "confirmed": True if confirmed is None else bool(confirmed[i]),
        }
        for i, (box, s, c) in enumerate(zip(detections.xyxy, detections.confidence, detections.class_id))
    ]


def state_record(state: StreamState) -> dict:
    """The message's and the heartbeat's `stream_state` fields."""
    return {
        "state": state.state,
        "frozen": state.frozen,
        "outages": state.outages,
        "outage_s": round(state.outage_s, 3),
        "last_gap_s": round(state.last_gap_s, 3),
        "clock_jumps": state.clock_jumps,
        "last_jump_s": round(state.last_jump_s, 6),
    }


def detection_message(
    frame: Frame, detections: Detections, model: ModelRef, latency: Latency, state: StreamState
) -> dict:
    """The message object of one frame (boxes in source-frame pixels), with its stream's state when it was made."""
    return {
        "schema": SCHEMA_ID,
        "stream": frame.stream_id,
        "seq": frame.seq,
        "pts": round(frame.pts_s, 6),
        "captured_at": iso_utc(frame.decoded_at),
        "model": {"name": model.name, "sha256": model.sha256},
        "frame": {"width": frame.width, "height": frame.height},
        "detections": detection_records(detections, model.class_names),
        "latency_ms": latency.as_message(),
        "stream_state": state_record(state),
    }


def track_message(stream_id: str, event: TrackEvent, model: ModelRef) -> dict:
    """A track event's message object (streamd.track/1)."""
    return {
        "schema": TRACK_SCHEMA_ID,
        "stream": stream_id,
        "event": event.kind,
        "track_id": event.track_id,
        "label": label_of(event.class_id, model.class_names),
        "class_id": event.class_id,
        "first_pts": round(event.first_pts_s, 6),
        "last_pts": round(event.last_pts_s, 6),
        "duration_s": round(event.duration_s, 6),
        "frames": event.frames,
        "best_score": round(event.best_score, 4),
        "model": {"name": model.name, "sha256": model.sha256},
    }


def heartbeat_message(wall_clock_s: float, uptime_s: float, state: str, model: ModelRef, streams: dict) -> bytes:
    """The encoded heartbeat (streamd.heartbeat/2): the pipeline's state and each stream's (streamd.ops.heartbeat)."""
    return encode({
        "schema": HEARTBEAT_SCHEMA_ID,
        "sent_at": iso_utc(wall_clock_s),
        "uptime_s": round(uptime_s, 3),
        "state": state,
        "model": {"name": model.name, "sha256": model.sha256},
        "streams": streams,
    })  # fmt: skip


def encode(message: dict) -> bytes:
    """Compact UTF-8 JSON: the payload frame of a ZeroMQ message and one log line.

    Strict JSON only: a NaN or infinite number raises ValueError naming the message's schema and stream,
    never the bare `NaN` / `Infinity` that strict parsers reject.
    """
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise ValueError(
            f"message {message.get('schema')!r} of stream {message.get('stream')!r} is not JSON: {exc}"
        ) from exc


def encode_message(
    frame: Frame, detections: Detections, model: ModelRef, latency: Latency, state: StreamState | None = None
) -> bytes:
    """The encoded message of one frame, as FrameResult.message carries it (state: the stream's; None: running)."""
    return encode(detection_message(frame, detections, model, latency, state or StreamState("running")))


@cache
def schema(schema_id: str = SCHEMA_ID) -> dict:
    """The JSON Schema of a message version (default: the one this daemon writes, detections.v3.json)."""
    return json.loads(resources.files("streamd.schemas").joinpath(SCHEMA_FILES[schema_id]).read_text())
