"""streamd.stages.message: each message encoded once, after the stream's tracker, with the stream's state."""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np

from streamd.messages import detection_message, schema
from streamd.model.detections import Detections
from streamd.ops.metrics import Metrics
from streamd.stages.message import MessageStage
from streamd.tracking import TrackEvent
from streamd.types import Frame, FrameResult, Latency, ModelRef, StreamState, TrackReport

MODEL = ModelRef("tiny", "ab" * 32, ("cell", "wbc"))


def frame(seq: int, **flags) -> Frame:
    return Frame("s", seq, seq / 25, np.zeros((48, 64, 3), np.uint8), decoded_at=time.time(), **flags)


def result(seq: int, **flags) -> FrameResult:
    found = Detections([[1, 2, 30, 40]], [0.8], [1]).with_tracks(np.array([7]), np.array([True]))
    return FrameResult(frame(seq, **flags), found, MODEL, Latency(1.0, 2.0, 3.0, 6.0))


def test_the_message_is_encoded_once_with_its_tracks_and_the_streams_state():
    metrics = Metrics(["s"])
    stage = MessageStage("s", MODEL, metrics)
    (out,) = stage.process(result(3))
    message = json.loads(out.message)
    jsonschema.validate(message, schema())
    assert message == json.loads(json.dumps(detection_message(
        out.frame, out.detections, MODEL, out.latency, StreamState("starting"))))  # fmt: skip
    assert message["detections"][0]["track_id"] == 7 and message["detections"][0]["confirmed"] is True


def test_what_a_dropped_frame_carried_reaches_the_next_message():
    """An outage's end, a clock jump and a freeze are folded into the stream's state when the frame is decoded
    (Metrics.observe, in the source's thread): the frame that carried them may be dropped, the next message says so."""
    metrics = Metrics(["s"])
    metrics.source_state("s", "running")
    for flagged in (frame(10, gap_s=4.25), frame(11, pts_jump_s=-3.5), frame(12, frozen=True)):
        metrics.observe(flagged)  # then dropped: never inferred, never encoded
    (out,) = MessageStage("s", MODEL, metrics).process(result(13, frozen=True))
    state = json.loads(out.message)["stream_state"]
    assert state == {"state": "frozen", "frozen": True, "outages": 0, "outage_s": 4.25, "last_gap_s": 4.25,
                     "clock_jumps": 1, "last_jump_s": -3.5}  # fmt: skip


def test_a_track_event_is_encoded_on_its_own_schema():
    event = TrackEvent("ended", 7, 1, first_pts_s=1.0, last_pts_s=3.5, frames=60, best_score=0.91)
    (out,) = MessageStage("s", MODEL, Metrics(["s"])).process(TrackReport("s", event))
    message = json.loads(out.message)
    jsonschema.validate(message, schema("streamd.track/1"))
    assert (message["event"], message["label"], message["duration_s"], message["frames"]) == ("ended", "wbc", 2.5, 60)
