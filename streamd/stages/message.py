"""A stream's message stage: the last of its own stages, where each message is encoded once.

FrameResult -> the same with `message` (streamd.detections/3, with the stream's state now: outages, clock jumps,
frozen, stale, from streamd.ops.metrics, so what a dropped frame carried is never lost); TrackReport -> the same
with its streamd.track/1 message. The detection log writes these bytes and the publisher sends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from streamd.messages import encode, encode_message, track_message
from streamd.ops.metrics import Metrics
from streamd.types import FrameResult, Latency, ModelRef, TrackReport


class MessageStage:
    name = "message"

    def __init__(self, stream_id: str, model: ModelRef, metrics: Metrics, *, wall_clock: bool = True):
        self.stream_id = stream_id
        self.model = model
        self.metrics = metrics
        self.wall_clock = wall_clock  # False: no wall-clock field, for byte-identical replays (see compose.Switches)

    def setup(self) -> None:
        pass

    def process(self, item: FrameResult | TrackReport) -> Iterator[FrameResult | TrackReport]:
        match item:
            case FrameResult(frame=frame, detections=detections, model=model, latency=latency):
                state = self.metrics.stream_state(self.stream_id)
                if not self.wall_clock:
                    frame, latency = replace(frame, decoded_at=frame.pts_s), Latency(0.0, 0.0, 0.0, 0.0)
                    state = replace(state, state="running")
                message = encode_message(frame, detections, model, latency, state)
                yield replace(item, frame=frame, message=message)  # no wall clock downstream: log names follow pts
            case TrackReport(event=event):
                yield replace(item, message=encode(track_message(self.stream_id, event, self.model)))
            case _:
                raise TypeError(f"message: cannot encode {type(item).__name__}")

    def close(self) -> None:
        pass
