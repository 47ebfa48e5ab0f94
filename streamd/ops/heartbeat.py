"""The heartbeat: the daemon's state once a second (streamd.heartbeat/1), published on topic _heartbeat.

Without it a subscriber cannot tell "running, nothing found" from "not
running". Each stream's state comes from the pipeline's Metrics: its source
(starting, running, reconnecting, ended, failed), whether its last frame was
frozen, and whether its last result is older than its max_age_ms (stale).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from streamd.messages import heartbeat_message
from streamd.ops.metrics import Metrics
from streamd.types import Heartbeat, ModelRef

HEARTBEAT_EVERY_S = 1.0


class HeartbeatSource:
    """Makes Heartbeat items; max_age_ms: the stale budget per stream (streams without one are never stale)."""

    def __init__(self, metrics: Metrics, model: ModelRef, max_age_ms: Mapping[str, float]):
        self.metrics = metrics
        self.model = model
        self.max_age_ms = dict(max_age_ms)
        self.started = time.monotonic()

    def stream_states(self) -> dict[str, dict]:
        counts = {c.stream_id: c for c in self.metrics.counts()}  # counters and fps only: no latency percentiles
        states = {}
        for stream_id, (source, frozen, since_result_s) in self.metrics.states().items():
            state = source
            if source == "running":
                budget = self.max_age_ms.get(stream_id)
                if budget is not None and since_result_s is not None and since_result_s * 1e3 > budget:
                    state = "stale"
                elif frozen:
                    state = "frozen"
            stream = counts[stream_id]
            totals = dict(stream.counts)
            states[stream_id] = {
                "state": state,
                "frames_in": totals["frames_in"],
                "processed": totals["processed"],
                "fps": round(stream.fps, 2),
                "last_result_age_ms": None if since_result_s is None else round(since_result_s * 1e3, 1),
            }
        return states

    def beat(self, stopping: bool = False) -> Heartbeat:
        message = heartbeat_message(
            time.time(), time.monotonic() - self.started, "stopping" if stopping else "running", self.model,
            self.stream_states(),
        )  # fmt: skip
        return Heartbeat(message)
