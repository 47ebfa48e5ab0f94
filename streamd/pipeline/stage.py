"""The two shapes of work the runner drives. Threads, queues and timeouts belong to the runner.

A Source produces frames for one stream; a Stage turns an item into zero or
more items. Neither owns a thread or a queue: `streamd.pipeline.runner`
does, so that stop, timeouts and end-of-stream are handled in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from streamd.types import Frame


class Source(Protocol):
    """One video stream.

    live: True for cameras and network streams (the runner drops the oldest
    queued frame when inference falls behind), False for files (the runner
    blocks, so no frame is lost).
    read() returns the next frame, or None at the end of a file; it raises
    streamd.errors.SourceError when a live connection is lost (the runner
    logs it and calls open() again after a back-off).
    """

    stream_id: str
    live: bool

    def open(self) -> None: ...

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


class Stage(Protocol):
    """setup() once, process(item) per item (yielding outputs), close() once at the end.

    close() must flush and release everything (a recorder finishes its file
    there), and is called even after an error upstream.
    """

    name: str

    def setup(self) -> None: ...

    def process(self, item: Any) -> Iterable[Any]: ...

    def close(self) -> None: ...
