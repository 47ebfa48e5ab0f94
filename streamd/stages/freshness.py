"""Freshness: a result older than its stream's budget is never published; it is dropped and counted as stale.

It sits in the publisher's worker, right before the socket, so the age it
checks is the age at the send: from the packet leaving the demuxer
(decode_ms before decoded_at) to now. Streams without a budget (files read as
fast as they decode) are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from streamd.ops.metrics import Metrics, dropped
from streamd.types import FrameResult, Heartbeat, TrackReport


class FreshnessStage:
    """FrameResult -> the same FrameResult, or nothing (counted as dropped: stale) when older than max_age_ms; a
    track event or a heartbeat -> itself (never stale).

    max_age_ms: the budget per stream id; a stream missing from it has none.
    """

    name = "freshness"

    def __init__(self, max_age_ms: Mapping[str, float], metrics: Metrics):
        self.max_age_ms = dict(max_age_ms)
        self.metrics = metrics

    def setup(self) -> None:
        pass

    def process(self, item: FrameResult | TrackReport | Heartbeat) -> Iterator[FrameResult | TrackReport | Heartbeat]:
        """A frame's result older than its budget goes no further; control items (track events, the heartbeat)
        are never stale."""
        if isinstance(item, FrameResult):
            budget = self.max_age_ms.get(item.stream_id)
            if budget is not None and item.frame.age_ms(time.time()) > budget:
                self.metrics.count(item.stream_id, dropped("stale"))
                return
        yield item

    def close(self) -> None:
        pass
