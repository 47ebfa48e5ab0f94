"""Archive: a stream's own packets, remuxed as they arrive (no decode, no encode), in segments that play after a crash.

Why a packet tap in the source, with a writer thread of its own, and not a stage: a stage gets decoded frames
after the stream's queues, where a live stream drops frames when inference is slow; the archive must hold every
frame the decoder gave, as the source's packets, so it is fed where the packets are, in the source thread
(`AVSource` calls `opened`, `packet`, `frame`, `restart` and `close`). What the source thread does per packet
is a copy of its bytes into a bounded queue (`MAX_QUEUED_BYTES`), never a wait; the files are written by the
tap's own thread, so a slow or stalled disk never stalls a live source's reads (the queue fills, and what does
not fit is dropped and counted as `archive` drops, the segment ends there and a new one starts at the next
keyframe: never a hole inside a segment). Closing the source waits at most `CLOSE_WAIT_S` for the writer.

Segments: one Segmenter (streamd.segments) on the decoded frames, the rule of the recordings and logs
(segment_s, a frame after an outage), plus a clock jump, a file's loop and a retry after a failure. A segment
can only start on a keyframe whose packet nothing else depends on before it, so the archive segment starts on
the first keyframe at or after the Segmenter's first frame of that segment (the frame itself when it is a
keyframe), and takes that segment's name: `{id}_{UTC}_{NNNN}.mp4` beside the recording and log of the same name.
Packets are held in the source until their frame is out of the decoder, so the tap knows which frame a
keyframe packet is: an open-GOP keyframe (its leading pictures need the GOP before) is never a cut point.

Finding a frame: each archive segment's metadata (`ffprobe -show_entries format_tags`) holds
`streamd_first_seq` and `streamd_first_pts_s`, the seq and pts of its first frame (in presentation order);
a detection-log line's frame is frame number `seq - streamd_first_seq` of the archive segment with the
largest `streamd_first_seq` <= seq (MPEG-TS segments have no such tags: see `container_for`).

Files: fragmented MP4 (a fragment per keyframe or 0.5 s, flushed as it is complete), Matroska for codecs MP4
does not take (clusters of 0.5 s), MPEG-TS for H.264/HEVC whose parameters were not in the stream's header
(every packet stands alone); so kill -9 loses at most the open fragment. As the recorder's: a hidden
`.{name}.partial` (created O_EXCL|O_NOFOLLOW, 0600, in a 0700 folder) until its first fragment is complete,
a write that fails cut back to its last complete fragment, crash leftovers of this stream removed at start.

Failure (a full disk, a folder that cannot be written): this stream's archive only. Logged, counted in the
stream's errors; its packets are dropped and counted as `archive failed`, and it is tried again at the first
keyframe after RETRY_S, doubling up to RETRY_MAX_S while it keeps failing, like a failed stage
(streamd.pipeline.worker). Decoding, detection, recording and the logs go on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import av.error

from streamd.checks import Finding, folder_findings
from streamd.config import ArchiveConfig
from streamd.errors import OutputError
from streamd.ops.metrics import Metrics, dropped
from streamd.pipeline.worker import RETRY_MAX_S, RETRY_S
from streamd.segments import Segmenter, make_folder, open_new, publish
from streamd.stages.record import SegmentFile, partial_name, remove_partials
from streamd.types import Frame

log = logging.getLogger(__name__)

MAX_QUEUED_BYTES = 64 * 1024 * 1024  # packets waiting for the writer: ~60 s of an 8 Mbit/s camera
CLOSE_WAIT_S = 1.0  # the most a source's close (and so a reconnect) waits for the writer to finish its segment
FRAGMENT_S = 0.5  # longest fragment (MP4) or cluster (Matroska): the most a kill -9 loses
_MAX_PENDING = 64  # packets held for their frame; more: the decoder dropped them, they go on without one
_MP4_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4", "mjpeg"})
_ANNEX_B = frozenset({"h264", "hevc"})  # may carry their parameter sets in band (MPEG-TS, RTP)
_EXTENSIONS = {"mp4": "mp4", "matroska": "mkv", "mpegts": "ts"}
ARCHIVE_DROPPED = dropped("archive")  # a packet the writer's queue had no room for (the disk is too slow)
ARCHIVE_FAILED = dropped("archive failed")  # a packet not written while the archive was failed


def container_for(codec_name: str, has_extradata: bool) -> str:
    """The format a stream's packets are remuxed into: mp4 (fragmented), or mpegts for H.264/HEVC whose parameter
    sets come in band only (an MP4 header needs them before the first packet), or matroska for the other codecs."""
    if codec_name in _ANNEX_B and not has_extradata:
        return "mpegts"
    return "mp4" if codec_name in _MP4_CODECS else "matroska"


@dataclass(frozen=True, slots=True)
class ArchivePacket:
    """One demuxed packet, copied: its bytes, pts and dts in the stream's time base (None: unknown), duration."""

    data: bytes
    pts: int | None
    dts: int | None
    duration: int
    keyframe: bool


class CodecTemplate:
    """A copy of an opened stream's codec parameters and time base, outliving the source's container (closed on a
    reconnect): a stream of a private in-memory muxer that is never written."""

    def __init__(self, stream: av.VideoStream) -> None:
        self._holder = av.open(io.BytesIO(), "w", format="matroska")
        self.stream = self._holder.add_stream_from_template(stream)
        self.time_base = stream.time_base
        self.codec_name = stream.codec_context.name
        self.format = container_for(self.codec_name, bool(stream.codec_context.extradata))


@dataclass(frozen=True, slots=True)
class ArchiveCut:
    """Start segment `base_name` at the next packet (a keyframe), whose frame is `first_seq` at `first_pts_s`."""

    base_name: str
    template: CodecTemplate
    first_seq: int
    first_pts_s: float


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """Finish the segment being written (the source closed, or packets were lost: never a hole inside a file)."""


class ArchiveTap:
    """The archive of one stream: fed by its AVSource in the source thread, written by a thread of its own.

    config: the stream's `archive` settings; segment_s: the stream's segment length (the recordings' and logs').
    Counted in `metrics`: dropped("archive"), dropped("archive failed"), errors. `segments`: the files that got
    their name, in order.
    """

    def __init__(self, stream_id: str, config: ArchiveConfig, segment_s: float, metrics: Metrics) -> None:
        self.stream_id = stream_id
        self.directory = Path(config.dir)
        self.metrics = metrics
        self.segmenter = Segmenter(stream_id, segment_s)
        self._template: CodecTemplate | None = None
        self._pending: deque[ArchivePacket] = deque()  # decoded packets whose frame is not out yet, in decode order
        self._cut_wanted = False  # the Segmenter started a segment: cut at the next keyframe that can start one
        self._writing = False  # packets go to the writer (a segment was started and nothing was lost since)
        self._lost: str | None = None  # why packets are dropped until the next cut (counted under that reason)
        self._writer = _Writer(self)

    def check(self) -> Iterator[Finding]:
        """The folder is writable (streamd.checks.Checked)."""
        yield from folder_findings(("dir",), self.directory)

    def opened(self, stream: av.VideoStream) -> None:
        """The source (re)opened `stream`: its packets go to a new segment, from its first keyframe."""
        self._template = CodecTemplate(stream)
        self._pending.clear()
        self._end_segment(None)
        self.segmenter.cut()

    def restart(self) -> None:
        """A file loops: its timestamps start again, so a new segment starts (at its first frame, a keyframe)."""
        self._release(len(self._pending))
        self._end_segment(None)
        self.segmenter.cut()

    def packet(self, packet: av.Packet) -> None:
        """A packet the decoder took: held until its frame is out (`frame`)."""
        self._pending.append(ArchivePacket(bytes(packet), packet.pts, packet.dts, packet.duration or 0, packet.is_keyframe))
        if len(self._pending) > _MAX_PENDING:
            self._release(1)

    def frame(self, frame: Frame, source_pts: int | None, keyframe: bool) -> None:
        """A decoded frame (`source_pts`: its pts in the stream's time base): its packet, and those decoded before
        it, go to the writer; a segment starts at it when one is due and it is a keyframe that starts one."""
        if frame.pts_jump_s or (self._writer.retry_due() and not self._cut_wanted):
            self.segmenter.cut()
        if self.segmenter.advance(frame) is not None:
            self._cut_wanted = True
        if source_pts is None:  # no pts to match: the packets so far, and no cut here
            self._release(len(self._pending))
            return
        index = next((i for i, p in enumerate(self._pending) if p.pts == source_pts), None)
        if index is None:  # its packet went with a frame after it in decode order (a reference of B-frames)
            return
        self._release(index)
        if self._cut_wanted and keyframe and self._pending[0].keyframe and self._template is not None:
            segment = self.segmenter.current
            self._cut_wanted = False
            self._writing, self._lost = True, None
            self._writer.retrying()
            self._writer.put(ArchiveCut(segment.base_name, self._template, frame.seq, frame.pts_s), force=True)
        self._release(1)

    def close(self) -> None:
        """The source closed: the segment ends (a reopen starts a new one); waits up to CLOSE_WAIT_S for the file."""
        self._pending.clear()
        self._end_segment(None)
        self._writer.wait_idle(CLOSE_WAIT_S)

    @property
    def segments(self) -> list[Path]:
        return self._writer.segments

    def _release(self, count: int) -> None:
        """Hand the first `count` pending packets to the writer (or drop them, counted, while packets are lost)."""
        for _ in range(count):
            packet = self._pending.popleft()
            if self._writing and not self._writer.put(packet):
                log.warning("stream %r: the archive's writer is %d MiB behind (a slow disk): dropping packets until "
                            "the next keyframe, where a new segment starts", self.stream_id, MAX_QUEUED_BYTES >> 20)
                self._end_segment("archive")
            if not self._writing and self._lost is not None:
                self.metrics.count(self.stream_id, dropped(self._lost))

    def _end_segment(self, lost: str | None) -> None:
        if self._writing:
            self._writer.put(ArchiveEnd(), force=True)
        self._writing, self._lost = False, lost
        if lost is not None:
            self.segmenter.cut()



class _Writer:
    """The tap's thread: muxes the queued packets into the segment files; started when there is work, ended when
    there is none (so nothing outlives the source but a segment still being finished)."""

    def __init__(self, tap: ArchiveTap) -> None:
        self.tap = tap
        self.segments: list[Path] = []
        self._queue: deque[ArchivePacket | ArchiveCut | ArchiveEnd] = deque()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = False  # crash leftovers were removed (by the first segment)
        self._retry_at: float | None = None  # monotonic: when a failed archive may start a segment again
        self._retry_sent = False  # the tap has sent the retry's cut (it asks for one cut per retry)
        self._retry_wait_s = RETRY_S
        self._file: SegmentFile | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._cut: ArchiveCut | None = None
        self._path: Path | None = None
        self._named: Path | None = None
        self._last_dts: int | None = None

    def put(self, item: ArchivePacket | ArchiveCut | ArchiveEnd, force: bool = False) -> bool:
        """Queue an item, never waiting: False when a packet does not fit (cuts and ends always do)."""
        size = len(item.data) if isinstance(item, ArchivePacket) else 0
        with self._lock:
            if not force and self._queued_bytes + size > MAX_QUEUED_BYTES:
                return False
            self._queue.append(item)
            self._queued_bytes += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"archive:{self.tap.stream_id}")
                self._thread.start()  # not a daemon: the process's exit waits for a segment being finished
            self._lock.notify()
        return True

    def wait_idle(self, timeout_s: float) -> None:
        """Wait until the thread has written everything queued and ended (at most timeout_s)."""
        with self._lock:
            self._lock.wait_for(lambda: self._thread is None, timeout_s)

    def retry_due(self) -> bool:
        """Whether the archive failed and may try again now (the tap then starts a segment at the next keyframe)."""
        return self._retry_at is not None and not self._retry_sent and time.monotonic() >= self._retry_at

    def retrying(self) -> None:
        """The tap sent a cut: if a retry was due, it is on its way (a cut before then, at a segment boundary, is
        skipped by the failed writer and must not use up the retry)."""
        self._retry_sent = self._retry_sent or self.retry_due()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    self._lock.notify_all()
                    return
                item = self._queue.popleft()
                if isinstance(item, ArchivePacket):
                    self._queued_bytes -= len(item.data)
            try:
                self._handle(item)
            except OutputError as exc:
                self._fail(exc)
            except Exception as exc:  # noqa: BLE001 (this stream's archive only: never the source thread's error)
                log.exception("stream %r: the archive failed", self.tap.stream_id)
                self._fail(exc)

    def _handle(self, item: ArchivePacket | ArchiveCut | ArchiveEnd) -> None:
        match item:
            case ArchivePacket() if self._container is not None:
                self._mux(item)
            case ArchivePacket():
                if self._retry_at is not None:
                    self.tap.metrics.count(self.tap.stream_id, ARCHIVE_FAILED)
            case ArchiveCut():
                self._close_segment()
                if self._retry_at is None or time.monotonic() >= self._retry_at:
                    self._open_segment(item)
            case ArchiveEnd():
                self._close_segment()

    def _fail(self, exc: BaseException) -> None:
        """This stream's archive stops until its retry; the file is finished as far as it was complete."""
        with contextlib.suppress(OutputError):
            self._close_segment()
        wait_s = self._retry_wait_s
        self._retry_at, self._retry_sent = time.monotonic() + wait_s, False
        self._retry_wait_s = min(wait_s * 2, RETRY_MAX_S)
        text = f"stream {self.tap.stream_id!r}: the archive failed: {exc}"
        log.error("%s; the archive of the stream stops, retrying in %.0f s (the rest goes on)", text, wait_s)
        self.tap.metrics.error(self.tap.stream_id, text)

    def _open_segment(self, cut: ArchiveCut) -> None:
        template = cut.template
        directory = self.tap.directory
        named = directory / f"{cut.base_name}.{_EXTENSIONS[template.format]}"
        path = partial_name(named)
        options = {"flush_packets": "1"}  # hand each fragment to the OS as soon as it is complete
        if template.format == "mp4":
            options["movflags"] = "frag_keyframe+empty_moov+default_base_moof+use_metadata_tags"
            options["frag_duration"] = str(int(FRAGMENT_S * 1_000_000))
        elif template.format == "matroska":
            options["cluster_time_limit"] = str(int(FRAGMENT_S * 1000))
        container, file = None, None
        try:
            make_folder(directory, "archive")  # again on a retry: the folder may have gone
            if not self._started:  # what a crash left, as the recorder does
                remove_partials(directory, self.tap.stream_id, _EXTENSIONS.values())
                self._started = True
            file = SegmentFile(open_new(path))
            container = av.open(file, mode="w", format=template.format, container_options=options)
            container.metadata.update({"streamd_stream": self.tap.stream_id, "streamd_first_seq": str(cut.first_seq),
                                       "streamd_first_pts_s": f"{cut.first_pts_s:.6f}"})  # fmt: skip
            stream = container.add_stream_from_template(template.stream)
            container.start_encoding()
            file.commit()  # the header
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            _abandon(container, file, path)
            raise OutputError(f"stream {self.tap.stream_id!r}: cannot start the archive segment {named}: {exc}") from exc
        self._container, self._stream, self._file, self._cut = container, stream, file, cut
        self._path, self._named, self._last_dts = path, named, None
        log.info("stream %r: archiving segment %s (%s in %s, from frame %d)",
                 self.tap.stream_id, named, template.codec_name, template.format, cut.first_seq)

    def _mux(self, item: ArchivePacket) -> None:
        dts = item.dts if item.dts is not None else item.pts
        if dts is not None and self._last_dts is not None and dts <= self._last_dts:
            # A clock that went back before the tap's cut at the next keyframe: it cannot be muxed in order.
            self.tap.metrics.count(self.tap.stream_id, ARCHIVE_DROPPED)
            return
        packet = av.Packet(item.data)
        packet.pts, packet.dts, packet.duration = item.pts, dts, item.duration
        packet.is_keyframe = item.keyframe
        packet.time_base = self._cut.template.time_base
        packet.stream = self._stream
        self._last_dts = dts
        try:
            self._container.mux(packet)
            if self._file.commit() and self._path != self._named:
                self._name_segment()
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"stream {self.tap.stream_id!r}: cannot write {self._named}: {exc}") from exc

    def _name_segment(self) -> None:
        """Its first fragment is complete: the segment gets its name (never replacing a file there)."""
        self._path = self._named = publish(self._path, self._named)
        self.segments.append(self._path)
        if self._retry_at is not None:
            log.info("stream %r: the archive works again: %s", self.tap.stream_id, self._path)
        self._retry_at, self._retry_wait_s = None, RETRY_S

    def _close_segment(self) -> None:
        """Finish the file; a file without a complete fragment (or whose first writes failed) is removed."""
        container, file = self._container, self._file
        if container is None:
            return
        self._container = self._stream = self._cut = None
        try:
            container.close()
            if file.commit() and self._path != self._named:
                self._name_segment()
            os.fsync(file.fd)
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"stream {self.tap.stream_id!r}: cannot finish {self._named}: {exc}") from exc
        finally:
            self._file = None
            file.close()
            if self._path != self._named:
                log.info("stream %r: %s had no complete fragment: removed", self.tap.stream_id, self._path)
                self._path.unlink(missing_ok=True)


def _abandon(container: av.container.OutputContainer | None, file: SegmentFile | None, path: Path) -> None:
    """Undo a segment's failed start: close what was opened and remove the file (ours, created new: it holds
    nothing)."""
    if container is not None:
        with contextlib.suppress(av.error.FFmpegError, OSError):
            container.close()
    if file is not None:
        file.close()
        path.unlink(missing_ok=True)
