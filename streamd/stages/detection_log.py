"""Detection log: one JSON line per frame (the published message's bytes), one .jsonl file per segment.

Segments and names follow `streamd.segments`, the recorder's rule with the
stream's one `segment_s`, so a log file has its recording's base name:
`eus-1_20261122T180000Z_0000.mp4` and `eus-1_20261122T180000Z_0000.jsonl`.
Each line is handed to the OS in one unbuffered write, so a crash loses at
most the line being written; `fsync_s` bounds what a power cut can lose.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from streamd.checks import Finding, folder_findings
from streamd.errors import OutputError
from streamd.segments import FILE_MODE, Segmenter, start_output
from streamd.types import AnnotatedFrame, FrameResult, TrackReport

log = logging.getLogger(__name__)


class DetectionLogStage:
    """FrameResult (or AnnotatedFrame) -> a line of `{stream_id}_{UTC start}_{index:04d}.jsonl` in `directory`.

    The line is the result's `message`, the same bytes the publisher sends.
    Yields its input unchanged, so it can end a chain or sit inside one.
    fsync_s: how often the file is forced to disk (None: never).
    """

    name = "detection_log"

    def __init__(self, stream_id: str, directory: Path, segment_s: float = 600, *, fsync_s: float | None = 5.0) -> None:
        self.stream_id = stream_id
        self.directory = Path(directory)
        self.segmenter = Segmenter(stream_id, segment_s)
        self.fsync_s = fsync_s
        self.segments: list[Path] = []
        self._file: BinaryIO | None = None
        self._last_fsync = 0.0

    def check(self) -> Iterator[Finding]:
        """The folder is writable (streamd.checks.Checked)."""
        yield from folder_findings(("dir",), self.directory)

    def setup(self) -> None:
        """Create the folder; the next frame opens a new segment (at start, and when retried after a failure)."""
        start_output(self.segmenter, self.directory, "detection-log")

    def process(
        self, item: FrameResult | AnnotatedFrame | TrackReport
    ) -> Iterator[FrameResult | AnnotatedFrame | TrackReport]:
        """Write the item's message as one line: a frame's into its segment (a new one when the frame starts one),
        a track event's into the current segment (none open: not written, the next frame opens one)."""
        if isinstance(item, TrackReport):
            if self._file is not None:
                self._write(item.message)
            yield item
            return
        match item:
            case AnnotatedFrame():
                result = item.result
            case FrameResult():
                result = item
            case _:
                raise TypeError(f"{self.name}: expected FrameResult or AnnotatedFrame, got {type(item).__name__}")
        if result.stream_id != self.stream_id:
            raise OutputError(f"detection log of stream {self.stream_id!r} got a frame of stream {result.stream_id!r}")
        segment = self.segmenter.advance(result.frame)
        if segment is not None or self._file is None:
            self.close()
            path = self.directory / f"{self.segmenter.current.base_name}.jsonl"
            try:
                self._file = _open_log(path)
            except OSError as exc:
                raise OutputError(f"stream {self.stream_id!r}: cannot open detection log {path}: {exc}") from exc
            self.segments.append(path)
            log.info("stream %r: detection log segment %d to %s", self.stream_id, self.segmenter.current.index, path)
        self._write(result.message)
        yield item

    def _write(self, message: bytes) -> None:
        if not message:
            raise OutputError(f"detection log of stream {self.stream_id!r}: an item without its encoded message")
        try:
            self._file.write(message + b"\n")
            if self.fsync_s is not None and time.monotonic() - self._last_fsync >= self.fsync_s:
                os.fsync(self._file.fileno())
                self._last_fsync = time.monotonic()
        except OSError as exc:
            raise OutputError(f"stream {self.stream_id!r}: cannot write {self.segments[-1]}: {exc}") from exc

    def close(self) -> None:
        """Force the current file to disk and close it."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                if self.fsync_s is not None:
                    os.fsync(file.fileno())
            finally:
                file.close()


def _open_log(path: Path) -> BinaryIO:
    """The log file at `path`, opened to append, unbuffered, 0600: a restart within the same second continues
    its file instead of truncating it, and only the service user can read it.

    Never through a symlink (O_NOFOLLOW), never a FIFO or device (O_NONBLOCK, then checked), and never
    another user's file: PermissionError naming what is there.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, f"{path} is a symbolic link: streamd does not follow it") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise PermissionError(f"{path} is there and is not a file of this user's: streamd does not write into it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab", buffering=0)
