"""The detection message (DESIGN contract 2): one versioned type, one encoder.

The same object is published over ZeroMQ (as `[topic, json]`) and written as
one line of the detection log, so both carry the model's sha256.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import cache
from importlib import resources

from streamd.types import FrameResult

SCHEMA_ID = "streamd.detections/1"


def iso_utc(wall_clock_s: float) -> str:
    """2026-11-22T18:00:00.123456Z from a time.time() value."""
    return datetime.fromtimestamp(wall_clock_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def detection_message(result: FrameResult) -> dict:
    """The message object of one frame (boxes in source-frame pixels)."""
    frame = result.frame
    return {
        "schema": SCHEMA_ID,
        "stream": frame.stream_id,
        "seq": frame.seq,
        "pts": round(frame.pts_s, 6),
        "captured_at": iso_utc(frame.decoded_at),
        "model": {"name": result.model.name, "sha256": result.model.sha256},
        "frame": {"width": frame.width, "height": frame.height},
        "detections": result.detections.to_records(result.model.class_names),
        "latency_ms": result.latency.as_dict(),
    }


def encode(message: dict) -> bytes:
    """Compact UTF-8 JSON, the payload frame of a ZeroMQ message and one log line."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


@cache
def schema() -> dict:
    """The JSON Schema of the message (streamd/schemas/detections.v1.json)."""
    return json.loads(resources.files("streamd.schemas").joinpath("detections.v1.json").read_text())
