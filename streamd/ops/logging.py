"""The daemon's log format: every line names its stream.

    2026-11-22 18:00:00,123 INFO    [eus-room-1] streamd.pipeline.runner: connected

A line gets its stream from `extra={"stream": id}` (see `stream_extra`), or
else from the worker thread's name ("source:eus-room-1" -> "eus-room-1"),
or "-" for lines about the whole daemon. A source URL's user and password
are replaced by *** (streamd.redact). Under systemd (journald sets
$JOURNAL_STREAM) the timestamp is left out: the journal adds its own.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from streamd.redact import RedactFilter

FORMAT = "%(asctime)s %(levelname)-7s [%(stream)s] %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)-7s [%(stream)s] %(name)s: %(message)s"


def stream_extra(stream_id: str | None) -> dict[str, str | None]:
    """The `extra=` of a log call about one stream."""
    return {"stream": stream_id}


class StreamFilter(logging.Filter):
    """Fill in `record.stream` when the call did not name one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "stream", None):
            _, sep, stream = threading.current_thread().name.partition(":")
            record.stream = stream if sep else "-"
        return True


def setup_logging(level: str = "INFO", stream=None) -> None:
    """Configure the root logger once, for the CLI (library code only calls getLogger)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if os.environ.get("JOURNAL_STREAM") else FORMAT))
    handler.addFilter(StreamFilter())
    handler.addFilter(RedactFilter())  # a camera's password in its URL never reaches the journal
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
