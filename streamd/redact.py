"""A source URL's credentials never printed: `rtsp://admin:secret@cam/live` is shown as `rtsp://***@cam/live`.

Cameras take their user and password in the URL, and the URL turns up in
log lines (a lost source, a failed open), errors and the run summary, which
go to the journal that other admins read. Rather than trust every message
built from a URL, what is printed passes through `redact`: the log handler's
`RedactFilter` (streamd.ops.logging), and the CLI's error lines and summary.
"""

from __future__ import annotations

import logging
import re

# scheme:// then the userinfo: everything up to the last "@" before the path (a password may hold an unescaped
# "@" or ":", which FFmpeg's URL parser accepts the same way); "udp://@:5000" (no user, a multicast bind) stays.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]+@")


def redact(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


class RedactFilter(logging.Filter):
    """Redact a record's message and its exception text before a handler formats it (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (redacted := redact(message)) != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
