"""The detection message (DESIGN contract 2): one versioned type, one encoder, built once per frame.

The inference stage encodes each frame's message once (`encode_message`) and
carries the bytes on the FrameResult; the ZeroMQ publisher sends them and the
detection log writes them as one line, so both carry the same bytes and the
model's sha256.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import cache
from importlib import resources

from streamd.model.detections import Detections
from streamd.types import Frame, Latency, ModelRef

SCHEMA_ID = "streamd.detections/2"
# Every version ever published, for subscribers that meet an older daemon: id -> schema file.
HEARTBEAT_SCHEMA_ID = "streamd.heartbeat/1"
SCHEMA_FILES = {
    "streamd.detections/1": "detections.v1.json",
    "streamd.detections/2": "detections.v2.json",
    HEARTBEAT_SCHEMA_ID: "heartbeat.v1.json",
}


def iso_utc(wall_clock_s: float) -> str:
    """2026-11-22T18:00:00.123456Z from a time.time() value."""
    return datetime.fromtimestamp(wall_clock_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def detection_message(frame: Frame, detections: Detections, model: ModelRef, latency: Latency) -> dict:
    """The message object of one frame (boxes in source-frame pixels)."""
    return {
        "schema": SCHEMA_ID,
        "stream": frame.stream_id,
        "seq": frame.seq,
        "pts": round(frame.pts_s, 6),
        "captured_at": iso_utc(frame.decoded_at),
        "model": {"name": model.name, "sha256": model.sha256},
        "frame": {"width": frame.width, "height": frame.height},
        "detections": detections.to_records(model.class_names),
        "latency_ms": latency.as_message(),
        "frozen": frame.frozen,
        "gap_s": round(frame.gap_s, 3),
        "pts_jump_s": round(frame.pts_jump_s, 6),
    }


def heartbeat_message(wall_clock_s: float, uptime_s: float, state: str, model: ModelRef, streams: dict) -> bytes:
    """The encoded heartbeat (streamd.heartbeat/1): the pipeline's state and each stream's (streamd.ops.heartbeat)."""
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


def encode_message(frame: Frame, detections: Detections, model: ModelRef, latency: Latency) -> bytes:
    """The encoded message of one frame, as FrameResult.message carries it."""
    return encode(detection_message(frame, detections, model, latency))


@cache
def schema(schema_id: str = SCHEMA_ID) -> dict:
    """The JSON Schema of a message version (default: the one this daemon writes, detections.v2.json)."""
    return json.loads(resources.files("streamd.schemas").joinpath(SCHEMA_FILES[schema_id]).read_text())
