"""ZeroMQ PUB (DESIGN contract 2): one socket per daemon, multipart [stream id, JSON message].

The socket is created in `setup()` and used by one thread only (the
runner's publisher worker): ZeroMQ sockets are not thread-safe. Sends use
NOBLOCK, so a slow subscriber never stalls the pipeline: a message ZeroMQ
will not take is counted as dropped. (PUB itself discards messages for a
subscriber past SNDHWM without an error; subscribers see that as a gap in
`seq`, which `streamd listen` reports.)
"""

from __future__ import annotations

import dataclasses
import logging
import time

import zmq

from streamd.errors import OutputError
from streamd.messages import detection_message, encode
from streamd.ops.metrics import Metrics
from streamd.types import FrameResult

log = logging.getLogger(__name__)


class PublishStage:
    """FrameResult -> one ZeroMQ message, its `total` latency measured at the send (decoded -> published).

    A sink: process() yields nothing.

    context: the process's one zmq.Context, owned by the caller.
    sndhwm: ZMQ_SNDHWM, messages queued per subscriber; linger_ms: ZMQ_LINGER at close.
    """

    name = "publish"

    def __init__(self, context: zmq.Context, bind: str, sndhwm: int = 1000, linger_ms: int = 100, metrics: Metrics | None = None):
        self.context = context
        self.bind = bind
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.metrics = metrics
        self.socket: zmq.Socket | None = None
        self.sent = 0
        self.dropped = 0

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

    def process(self, result: FrameResult) -> tuple[()]:
        if self.socket is None:
            raise OutputError("publish: process() before setup()")
        frame = result.frame
        latency = dataclasses.replace(result.latency, total=max(0.0, (time.time() - frame.decoded_at) * 1e3))
        result = dataclasses.replace(result, latency=latency)
        payload = encode(detection_message(result))
        try:
            self.socket.send_multipart([frame.stream_id.encode(), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.publish_dropped(frame.stream_id)
        except zmq.ZMQError as exc:
            raise OutputError(f"publish: send on {self.bind} failed: {exc}") from exc
        else:
            self.sent += 1
            if self.metrics is not None:
                self.metrics.published(frame.stream_id)
        return ()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=self.linger_ms)
            self.socket = None
