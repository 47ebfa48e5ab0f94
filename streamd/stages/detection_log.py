"""Detection log: one JSON line per frame (the published message's bytes), one .jsonl file per segment.

Segments and names follow `streamd.segments`, the recorder's rule with the
stream's one `segment_s`, so a log file has its recording's base name:
`eus-1_20261122T180000Z_0000.mp4` and `eus-1_20261122T180000Z_0000.jsonl`.
Each line is handed to the OS in one unbuffered write, so a crash loses at
most the line being written; `fsync_s` bounds what a power cut can lose.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from streamd.errors import OutputError
from streamd.segments import FILE_MODE, Segmenter, start_output
from streamd.types import AnnotatedFrame, FrameResult

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

    def setup(self) -> None:
        """Create the folder; the next frame opens a new segment (at start, and when retried after a failure)."""
        start_output(self.segmenter, self.directory, "detection-log")

    def process(self, item: FrameResult | AnnotatedFrame) -> Iterator[FrameResult | AnnotatedFrame]:
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
                # Append, unbuffered, 0600: a restart within the same second continues the file instead of
                # truncating it, and only the service user can read it.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
                self._file = os.fdopen(fd, "ab", buffering=0)  # noqa: SIM115 (closed in close())
            except OSError as exc:
                raise OutputError(f"stream {self.stream_id!r}: cannot open detection log {path}: {exc}") from exc
            self.segments.append(path)
            log.info("stream %r: detection log segment %d to %s", self.stream_id, self.segmenter.current.index, path)
        try:
            self._file.write(result.message + b"\n")
            if self.fsync_s is not None and time.monotonic() - self._last_fsync >= self.fsync_s:
                os.fsync(self._file.fileno())
                self._last_fsync = time.monotonic()
        except OSError as exc:
            raise OutputError(f"stream {self.stream_id!r}: cannot write {self.segments[-1]}: {exc}") from exc
        yield item

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                if self.fsync_s is not None:
                    os.fsync(file.fileno())
            finally:
                file.close()
