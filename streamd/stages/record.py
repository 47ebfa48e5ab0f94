"""Record: the annotated frames of one stream into H.264 segments that play even after a crash.

Each segment is its own file and its own encoder, so that it starts on a
keyframe and plays alone. MP4 segments are fragmented (empty moov, a fragment
per keyframe or per `fragment_s`, each flushed to the OS as it is written):
a file cut off at any moment, by kill -9 or a power cut, plays up to its
last complete fragment. `fsync_s` bounds what a power cut can lose.

Segments and their names follow `streamd.segments` (the same rule as the
detection log's). After a failure (a full disk) the runner closes the stage
and later calls setup() again: the next frame then opens a new segment, so
a recording never splices across the frames it could not write.

No file without a playable frame: a segment is written to a hidden temporary
name (`.{name}.partial`, created new: never a file or link already there) and
gets its name once its first fragment is complete; a segment that never gets
one is removed at close, and a temporary that a kill -9 left is removed at
the next start (only that name pattern, only this user's files). A write that
fails (a full disk) cuts the file back to its last complete fragment, so it
never ends in half a fragment.
"""

from __future__ import annotations

import contextlib
import io
import errno
import glob
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import av.error
import numpy as np

from streamd.checks import Finding, folder_findings
from streamd.config import RecordConfig
from streamd.errors import OutputError
from streamd.segments import Segment, Segmenter, open_new, publish, start_output
from streamd.types import AnnotatedFrame, Frame, FrameResult

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90_000)  # the MPEG clock: exact for 24, 25, 30, 50, 60 and 29.97 fps
# x264 presets mapped onto NVENC's p1 (fastest) .. p7 (best) scale.
_NVENC_PRESETS = {
    "ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
    "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7",
}  # fmt: skip
_CONTAINERS = {"mp4": "mp4", "mkv": "matroska"}


@cache
def nvenc_opens() -> bool:
    """True when this PyAV has h264_nvenc and it actually opens (a GPU, a driver, a free session)."""
    if "h264_nvenc" not in av.codecs_available:
        return False
    try:
        context = av.CodecContext.create("h264_nvenc", "w")
        context.width, context.height, context.pix_fmt = 256, 256, "yuv420p"
        context.time_base = Fraction(1, 30)
        context.open()
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        log.info("h264_nvenc is built in but does not open (%s): recording with libx264", exc)
        return False
    return True


_PARTIAL = ".partial"


def partial_name(path: Path) -> Path:
    """The hidden name a segment is written under until its first fragment is complete: `.{name}.partial`."""
    return path.with_name(f".{path.name}{_PARTIAL}")


def remove_partials(directory: Path, stream_id: str, extensions: Iterable[str]) -> None:
    """Remove what a crash left of a stream's segments before their first fragment: its hidden temporaries
    (`.{stream_id}_{UTC}_{index}.{ext}.partial`, ext one of `extensions`) that are regular files of this user,
    each logged. Nothing else in the folder is touched."""
    alternatives = "|".join(map(re.escape, extensions))
    pattern = re.compile(rf"\.{re.escape(stream_id)}_\d{{8}}T\d{{6}}Z_\d{{4}}\.({alternatives}){re.escape(_PARTIAL)}")
    for path in sorted(directory.glob(f".{glob.escape(stream_id)}_*{_PARTIAL}")):
        info = path.lstat()
        if pattern.fullmatch(path.name) and stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
            log.warning("stream %r: removing %s: a crash left it before its first fragment", stream_id, path)
            path.unlink(missing_ok=True)


class SegmentFile:
    """The file a segment is muxed into (PyAV writes through it): the descriptor streamd opened, where its last
    complete fragment ends, and the cut back to there when a write fails.

    The muxer flushes each finished fragment in full before mux() returns (flush_packets), so the size after a
    successful mux() is a fragment boundary (`commit`). After a failed write the file is cut back to the last
    boundary and every later write fails: nothing is appended after a hole.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.complete_bytes = 0  # the end of the last complete fragment (or of the header)
        self.failed = False

    def write(self, data: bytes) -> int:
        if self.failed:
            raise OSError(errno.EIO, "an earlier write of this segment failed")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            self.failed = True
            os.ftruncate(self.fd, self.complete_bytes)
            os.lseek(self.fd, self.complete_bytes, os.SEEK_SET)
            raise
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def commit(self) -> bool:
        """Mark the end of the file as complete (after a successful mux or close); whether it grew."""
        size = os.fstat(self.fd).st_size
        grew, self.complete_bytes = size > self.complete_bytes, size
        return grew

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")


def check_encoder(codec: str, preset: str) -> str | None:
    """Why `codec` / `preset` cannot record here, or None when they can (streamd validate runs this)."""
    if codec != "auto":
        try:
            encoder = av.Codec(codec, "w")
        except (av.error.FFmpegError, ValueError):
            return f"no encoder {codec!r} in this PyAV/FFmpeg build (use auto, libx264 or h264_nvenc)"
        if encoder.type != "video":
            return f"{codec!r} encodes {encoder.type}, not video"
    if codec in ("auto", "libx264") and preset not in X264_PRESETS:
        return f"preset {preset!r} is not an x264 preset: one of {', '.join(X264_PRESETS)}"
    if codec == "h264_nvenc" and preset not in _NVENC_PRESETS and preset not in {f"p{n}" for n in range(1, 8)}:
        return f"preset {preset!r} is not an NVENC preset: an x264 name or p1..p7"
    return None


def unrecordable(codec: str, container: str) -> str | None:
    """Why `codec` cannot encode one frame into a `container` segment here, or None.

    Encodes a 64x64 frame as the recorder does (yuv420p, in memory): a codec
    the container cannot hold (rawvideo in mp4), one that takes no yuv420p
    (mjpeg) or one without its device here (h264_nvenc without a GPU) is
    found now, instead of failing every segment. `auto` picks one that opens.
    """
    if codec == "auto":
        return None
    try:
        with av.open(io.BytesIO(), mode="w", format=_CONTAINERS[container]) as output:
            stream = output.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            output.start_encoding()
            for packet in (*stream.encode(av.VideoFrame(64, 64, "yuv420p")), *stream.encode()):
                output.mux(packet)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        return f"{codec} cannot record {container} segments here: {exc}"
    return None


def choose_codec(codec: str) -> str:
    """"auto" -> h264_nvenc when it opens here, else libx264; any other name as given."""
    if codec != "auto":
        return codec
    return "h264_nvenc" if nvenc_opens() else "libx264"


def _encoder_options(codec: str, preset: str, crf: int) -> dict[str, str]:
    if codec == "h264_nvenc":
        # Constant quality (cq ~ crf) on NVENC's own preset scale; no B-frames keeps latency and timestamps simple.
        return {"preset": _NVENC_PRESETS.get(preset, preset), "rc": "vbr", "cq": str(crf), "bf": "0"}
    if codec == "libx264":
        # zerolatency: no look-ahead and no frame threads, so a frame is muxed (and crash-safe) as soon as it is
        # encoded; without it x264 held ~10 frames, which a kill -9 lost on top of the open fragment.
        return {"preset": preset, "crf": str(crf), "tune": "zerolatency"}
    return {}


class RecordStage:
    """AnnotatedFrame -> H.264 segments `{stream_id}_{UTC start}_{index:04d}.mp4|.mkv` in `directory`.

    Also accepts a FrameResult or a Frame (records the source pixels). Frame
    rate and timestamps follow the source: pts is the frame's pts_s relative to
    the segment's first frame, on a 1/90000 time base, bumped by one tick when
    a frame does not move forward. Odd frame sizes are cropped by one pixel to
    the even size yuv420p needs. Yields its input unchanged, so it can end a
    chain or sit inside one.

    config: the stream's `record` settings (folder, codec, preset, crf, container);
    codec "auto" is h264_nvenc if it opens here, else libx264; preset/crf use
    x264's names and scale (mapped for NVENC). segment_s: the stream's
    segment length. fps: the nominal rate given to the encoder (default: the
    first frame's). keyframe_s: GOP length. fragment_s: longest MP4 fragment,
    the most a crash loses. fsync_s: how often the file is forced to disk
    (None: never).
    """

    name = "record"

    def __init__(
        self,
        stream_id: str,
        config: RecordConfig,
        segment_s: float = 600,
        *,
        fps: float | None = None,
        keyframe_s: float = 2.0,
        fragment_s: float = 0.5,
        fsync_s: float | None = 5.0,
    ) -> None:
        self.stream_id = stream_id
        self.config = config
        self.directory = Path(config.dir)
        self.segmenter = Segmenter(stream_id, segment_s)
        self.fps = fps
        self.keyframe_s = keyframe_s
        self.fragment_s = fragment_s
        self.fsync_s = fsync_s
        self.segments: list[Path] = []  # the segments that got their name (each with a playable frame)
        self._path: Path | None = None  # the current segment's file: its temporary name, then its own
        self._named: Path | None = None  # the name it will get
        self._file: SegmentFile | None = None
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._last_pts = -1
        self._last_fsync = 0.0

    def check(self) -> Iterator[Finding]:
        """The encoder, preset and container record here, and the folder is writable (streamd.checks.Checked)."""
        config = self.config
        if why := check_encoder(config.codec, config.preset) or unrecordable(config.codec, config.container):
            yield Finding((), why)
        yield from folder_findings(("dir",), self.directory)

    def setup(self) -> None:
        """Create the folder; the next frame opens a new segment (at start, and when retried after a failure).

        A segment that a crash left before its first complete fragment is still its hidden temporary: such a
        temporary of this stream (`.{stream_id}_{UTC}_{index}.{ext}.partial`, a regular file of this user) is
        removed here, and logged; nothing else in the folder is touched.
        """
        start_output(self.segmenter, self.directory, "recording")
        remove_partials(self.directory, self.stream_id, (self.config.container,))

    def process(self, item: AnnotatedFrame | FrameResult | Frame) -> Iterator[AnnotatedFrame | FrameResult | Frame]:
        match item:
            case AnnotatedFrame():
                frame, image = item.result.frame, item.image
            case FrameResult():
                frame, image = item.frame, item.frame.image
            case Frame():
                frame, image = item, item.image
            case _:
                raise TypeError(
                    f"{self.name}: expected AnnotatedFrame, FrameResult or Frame, got {type(item).__name__}"
                )
        if frame.stream_id != self.stream_id:
            raise OutputError(f"recorder of stream {self.stream_id!r} got a frame of stream {frame.stream_id!r}")
        segment = self.segmenter.advance(frame)
        if segment is not None or self._container is None:
            self._close_segment()
            self._open_segment(self.segmenter.current, frame)
        self._encode(frame, image)
        yield item

    def _open_segment(self, segment: Segment, frame: Frame) -> None:
        config = self.config
        named = self.directory / f"{segment.base_name}.{config.container}"
        path = partial_name(named)
        fps = self.fps or frame.fps
        codec = choose_codec(config.codec)
        options = {"flush_packets": "1"}  # hand each fragment/cluster to the OS as soon as it is complete
        if config.container == "mp4":
            options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
            options["frag_duration"] = str(int(self.fragment_s * 1_000_000))
        else:  # Matroska: a cluster per fragment_s, the same crash bound as an MP4 fragment
            options["cluster_time_limit"] = str(int(self.fragment_s * 1000))
        container, file = None, None
        try:
            file = SegmentFile(open_new(path))  # 0600, only the service user reads a procedure's recording
            container = av.open(file, mode="w", format=_CONTAINERS[config.container], container_options=options)
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frame.width & ~1, frame.height & ~1
            stream.pix_fmt = "yuv420p"
            stream.time_base = TIME_BASE
            stream.codec_context.time_base = TIME_BASE
            stream.codec_context.gop_size = max(1, round(self.keyframe_s * fps))
            # No B-frames: no reordering, so every packet is muxed (and survives a crash) as soon as it is encoded.
            stream.codec_context.max_b_frames = 0
            stream.options = _encoder_options(codec, config.preset, config.crf)
            container.start_encoding()
            file.commit()  # the header
        except (av.error.FFmpegError, OSError) as exc:
            if container is not None:
                with contextlib.suppress(av.error.FFmpegError, OSError):
                    container.close()
            if file is not None:  # ours (created new): a failed start plays nothing
                file.close()
                path.unlink(missing_ok=True)
            raise OutputError(f"stream {self.stream_id!r}: cannot start recording {named} with {codec}: {exc}") from exc
        self._container, self._stream, self._file = container, stream, file
        self._path, self._named = path, named
        self._last_pts = -1
        log.info("stream %r: recording segment %d to %s (%s, %dx%d, %.3g fps)",
                 self.stream_id, segment.index, named, codec, stream.width, stream.height, fps)

    def _encode(self, frame: Frame, image: np.ndarray) -> None:
        stream, container = self._stream, self._container
        height, width = stream.height, stream.width
        if image.shape[0] != height or image.shape[1] != width:  # odd size: drop the last row/column
            image = np.ascontiguousarray(image[:height, :width])
        video_frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        start_s = self.segmenter.current.start_pts_s
        pts = max(round((frame.pts_s - start_s) / TIME_BASE), self._last_pts + 1)
        video_frame.pts = pts
        video_frame.time_base = TIME_BASE
        self._last_pts = pts
        try:
            container.mux(stream.encode(video_frame))
            if self._file.commit() and self._path != self._named:
                self._name_segment()
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"stream {self.stream_id!r}: cannot write {self._named}: {exc}") from exc
        if self.fsync_s is not None and time.monotonic() - self._last_fsync >= self.fsync_s:
            self._fsync()

    def _name_segment(self) -> None:
        """Its first fragment is complete: the segment gets its name (never replacing a file there)."""
        self._path = self._named = publish(self._path, self._named)
        self.segments.append(self._path)
        self._fsync(directory_too=True)

    def _fsync(self, directory_too: bool = False) -> None:
        """Force the file (and its directory entry) to disk: what the muxer flushed survives a power cut."""
        if self.fsync_s is None:
            return
        self._last_fsync = time.monotonic()
        os.fsync(self._file.fd)
        if directory_too:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _close_segment(self) -> None:
        """Drain the encoder and finish the file; it gets its name if its only fragment came now, and a file that
        never got a complete fragment (or whose writes failed before its first) is removed: ours, and unplayable."""
        container, stream, file = self._container, self._stream, self._file
        if container is None:
            return
        self._container = self._stream = None
        try:
            try:
                container.mux(stream.encode(None))  # drain the encoder's delayed frames
            finally:
                container.close()
            if file.commit() and self._path != self._named:
                self._name_segment()
            self._fsync()
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"stream {self.stream_id!r}: cannot finish {self._named}: {exc}") from exc
        finally:
            self._file = None
            file.close()
            if self._path != self._named:
                log.info("stream %r: %s had no complete fragment: removed", self.stream_id, self._path)
                self._path.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush the encoder and finish the current segment (a segment without a complete fragment is removed)."""
        self._close_segment()
