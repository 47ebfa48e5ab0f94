"""The heartbeat: the daemon's state once a second (streamd.heartbeat/2), published on topic _heartbeat.

Without it a subscriber cannot tell "running, nothing found" from "not
running". It is a Ticker of the graph (streamd.pipeline.graph): a thread of
its own puts one into the publisher's queue each second. Each stream's state
is the one its messages carry (Metrics.stream_state: starting, running,
frozen, stale, reconnecting, ended, failed), with its counters.
"""

from __future__ import annotations

import time

from streamd.messages import heartbeat_message, state_record
from streamd.ops.metrics import Metrics
from streamd.types import Heartbeat, ModelRef

HEARTBEAT_EVERY_S = 1.0


class HeartbeatSource:
    """Makes Heartbeat items (a streamd.pipeline.stage.Ticker)."""

    name = "heartbeat"

    def __init__(self, metrics: Metrics, model: ModelRef, every_s: float = HEARTBEAT_EVERY_S):
        self.metrics = metrics
        self.model = model
        self.every_s = every_s
        self.started = time.monotonic()

    def stream_states(self) -> dict[str, dict]:
        counts = {c.stream_id: c for c in self.metrics.counts()}  # counters and fps only: no latency percentiles
        states = {}
        for stream_id, (state, since_result_s, since_delivered_s) in self.metrics.states().items():
            stream = counts[stream_id]
            totals = dict(stream.counts)
            states[stream_id] = {
                **state_record(state),
                "frames_in": totals["frames_in"],
                "processed": totals["processed"],
                "fps": round(stream.fps, 2),
                "last_result_age_ms": _age_ms(since_result_s),
                "last_delivered_age_ms": _age_ms(since_delivered_s),
            }
        return states

    def tick(self, stopping: bool = False) -> Heartbeat:
        message = heartbeat_message(
            time.time(), time.monotonic() - self.started, "stopping" if stopping else "running", self.model,
            self.stream_states(),
        )  # fmt: skip
        return Heartbeat(message)


def _age_ms(since_s: float | None) -> float | None:
    return None if since_s is None else round(since_s * 1e3, 1)
