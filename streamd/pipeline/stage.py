"""The shapes of work the runner drives. Threads, queues and timeouts belong to the runner, not to these.

A Source produces frames for one stream; a Ticker makes an item once per
period (the heartbeat); a Stage turns an item into zero or more items; an Inbox is what a worker reads (one BoundedQueue, or the
Batcher over every stream's input queue). `streamd.pipeline.graph` checks
these protocols when a pipeline is composed, so a wiring error raises there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from streamd.types import EndOfStream, Frame


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits between attempts to reopen a lost live source: initial_s, doubling up to max_s."""

    initial_s: float = 0.5
    max_s: float = 30.0


@runtime_checkable
class Source(Protocol):
    """One video stream.

    live: True for cameras and network streams (their queue drops the oldest
    frame when inference falls behind), False for files (the queue blocks, so
    no frame is lost).
    read() returns the next frame, or None at the end of a file. Any exception
    is that stream's error: a live source is opened again after a back-off, a
    file's stream ends with the error; other streams go on.
    backoff: the waits between reconnect attempts of a live source.
    """

    stream_id: str
    live: bool
    backoff: Backoff

    def open(self) -> None: ...

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


@runtime_checkable
class Ticker(Protocol):
    """Makes one control item every `every_s` seconds, in a thread of its own, while the pipeline runs (the heartbeat).

    tick(stopping) is told whether the pipeline is draining after a stop.
    """

    name: str
    every_s: float

    def tick(self, stopping: bool) -> Any: ...


@runtime_checkable
class Stage(Protocol):
    """setup() once before READY=1, process(item) per item (yielding outputs), close() once at the end.

    close() must flush and release everything (a recorder finishes its file
    there), and is called even after an error upstream. A stage of one stream
    whose process() fails is closed, and set up again later to retry.
    """

    name: str

    def setup(self) -> None: ...

    def process(self, item: Any) -> Iterable[Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class Ending(Protocol):
    """A stage with something to say when a stream ends (a tracker ends its open tracks): the runner calls
    end(end_of_stream) and routes what it yields before forwarding the end-of-stream."""

    def end(self, end: EndOfStream) -> Iterable[Any]: ...


@runtime_checkable
class Inbox(Protocol):
    """What one worker reads: get() the next item, raising queue.Empty after timeout_s seconds without one."""

    name: str

    def get(self, timeout_s: float) -> Any: ...
