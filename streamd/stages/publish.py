"""ZeroMQ PUB (DESIGN contract 2): one socket per daemon, multipart [stream id, JSON message].

The socket is created in `setup()` and used by one thread only (the
runner's publisher worker): ZeroMQ sockets are not thread-safe. Sends use
NOBLOCK, so a slow subscriber never stalls the pipeline: a message ZeroMQ
will not take is counted as dropped. (PUB itself discards messages for a
subscriber past SNDHWM without an error; subscribers see that as a gap in
`seq`, which `streamd listen` reports.)
"""

from __future__ import annotations

import logging

import zmq

from streamd.config import PublishConfig
from streamd.errors import OutputError
from streamd.ops.metrics import Metrics
from streamd.types import FrameResult, Heartbeat

log = logging.getLogger(__name__)


class PublishStage:
    """FrameResult -> one ZeroMQ message [stream id, result.message] (the bytes encoded once at inference).

    A sink: process() yields nothing. Counts `published` and `publish_dropped` in metrics.

    context: the process's one zmq.Context, owned by the caller.
    sndhwm: ZMQ_SNDHWM, messages queued per subscriber; linger_ms: ZMQ_LINGER at close.
    """

    name = "publish"

    def __init__(self, context: zmq.Context, config: PublishConfig, metrics: Metrics):
        self.context = context
        self.bind = config.bind
        self.sndhwm = config.sndhwm
        self.linger_ms = config.linger_ms
        self.metrics = metrics
        self.socket: zmq.Socket | None = None

    def setup(self) -> None:
        socket = self.context.socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, self.sndhwm)
        socket.setsockopt(zmq.LINGER, self.linger_ms)
        try:
            socket.bind(self.bind)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise OutputError(f"publish: cannot bind {self.bind}: {exc}") from exc
        self.socket = socket
        log.info("publishing on %s (SNDHWM %d, LINGER %d ms)", self.bind, self.sndhwm, self.linger_ms)

    def process(self, item: FrameResult | Heartbeat) -> tuple[()]:
        """Send [topic, message]: a result's on its stream id, a heartbeat's on _heartbeat (counted for no stream)."""
        if self.socket is None:
            raise OutputError("publish: process() before setup()")
        stream_id = item.stream_id
        try:
            self.socket.send_multipart([item.topic.encode(), item.message], flags=zmq.NOBLOCK)
        except zmq.Again:
            if stream_id is not None:
                self.metrics.count(stream_id, "publish_dropped")
        except zmq.ZMQError as exc:
            raise OutputError(f"publish: send on {self.bind} failed: {exc}") from exc
        else:
            if stream_id is not None:
                self.metrics.count(stream_id, "published")
        return ()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=self.linger_ms)
            self.socket = None
