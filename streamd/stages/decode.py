"""Sources: demux and decode one video stream with PyAV into `Frame`s (uint8 BGR, pts in seconds).

One class, `AVSource`, serves every kind of input; `open_source` picks the
demuxer and its options from the stream's config, whose `kind` was decided
once at validation (streamd.config.classify_source):

    kind    url                          live  options
    file    clip.mp4 .mkv .ts .avi ...   no    realtime pacing, loop
    rtsp    rtsp://host/path             yes   rtsp_transport tcp|udp, socket timeout (us)
    udp     udp://@:5000 (MPEG-TS)       yes   timeout (us), fifo_size, overrun_nonfatal
    rtp     rtp://host:5004 (MPEG-TS)    yes   timeout (us)
    srt     srt://host:port              yes   timeout (us); needs an FFmpeg built with libsrt
    v4l2    /dev/video0                  yes   video_size, framerate, input_format

Timing: pts_s is the frame's own presentation time (frame.time). It is kept
strictly increasing across loops, reconnects and timestamp resets by shifting
the source's time line (never by dropping a frame), so that recorders and
subscribers can trust it. seq counts frames per stream from 0 and goes on
across open() calls.

Failure: PyAV waits at most `timeout_s` for any open or read (its interrupt
callback), so a dead source never hangs the thread; every av.error becomes a
SourceError that names the stream and its URL. Packets the demuxer flags as
corrupt, and packets the decoder rejects, are skipped and counted
(`corrupt_packets`); successful opens and file loops are counted too, all in
the pipeline's Metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import av
import av.error
import cv2
import numpy as np

from streamd.config import SourceKind, StreamConfig
from streamd.errors import FatalError, SourceError
from streamd.ops.metrics import Metrics
from streamd.pipeline.stage import Backoff
from streamd.types import Frame

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
# Frames of slack before realtime pacing gives up catching up and restarts its clock (a stalled consumer
# must not be followed by a burst of frames at full speed).
_REALTIME_MAX_LAG_S = 0.5
# UDP receive ring in 188-byte units (~19 MB): absorbs a few seconds of a high-rate feed while the
# decoder is busy; with overrun_nonfatal a full ring loses packets (counted as corrupt) instead of failing.
_UDP_FIFO_SIZE = 100_000
# A live MPEG-TS feed is probed for 0.3 s (64 KiB) instead of FFmpeg's 5 s (5 MB): an open, and so a
# reconnect, takes about that plus the wait for a keyframe (a 5 fps feed with a keyframe every 10 frames:
# 4.5 s to the first frame with the default probe, 1.3 s with this one). The stream's parameters come with
# its first keyframe either way.
_SHORT_PROBE = {"analyzeduration": "300000", "probesize": "65536"}


def open_source(
    stream: StreamConfig, metrics: Metrics, *, model_hw: tuple[int, int] | None = None,
    options: dict[str, str] | None = None,
) -> AVSource:  # fmt: skip
    """The source of a validated stream config (not opened yet: the runner calls open()).

    model_hw: see AVSource (compose passes it for streams that are not recorded).
    options: extra FFmpeg options, applied last (tests, benchmarks).
    """
    micros = str(int(stream.timeout_s * 1_000_000))
    fmt: str | None = None
    opts: dict[str, str] = {}
    url = stream.source
    match stream.kind:
        case SourceKind.FILE:
            url = url.removeprefix("file://")
        case SourceKind.RTSP:
            # FFmpeg 5 renamed the RTSP socket timeout from stimeout to timeout (both in microseconds).
            timeout_key = "timeout" if av.library_versions["libavformat"][0] >= 59 else "stimeout"
            opts = {"rtsp_transport": stream.rtsp_transport, timeout_key: micros}
        case SourceKind.UDP:
            opts = {"timeout": micros, "fifo_size": str(_UDP_FIFO_SIZE), "overrun_nonfatal": "1", **_SHORT_PROBE}
        case SourceKind.RTP | SourceKind.SRT:
            opts = {"timeout": micros, **_SHORT_PROBE}
        case SourceKind.V4L2:
            fmt = "v4l2"
            v4l2 = stream.v4l2
            if v4l2.video_size:
                opts["video_size"] = v4l2.video_size
            if v4l2.framerate:
                opts["framerate"] = f"{v4l2.framerate:g}"
            if v4l2.pixel_format:
                opts["input_format"] = v4l2.pixel_format
    opts.update(options or {})
    return AVSource(
        stream.id, url, kind=stream.kind, metrics=metrics, format=fmt, options=opts, realtime=stream.realtime,
        loop=stream.loop, timeout_s=stream.timeout_s, backoff=Backoff(stream.reconnect.initial_s, stream.reconnect.max_s),
        frozen_after_s=stream.frozen_after_s if stream.kind.live else None, model_hw=model_hw,
    )


class TimeLine:
    """A stream's pts on one strictly increasing line, continuous across loops, reopens and clock jumps.

    A missing pts is one frame after the last. The first frame after a reopen
    goes on after the gap (by the wall clock). A source clock that goes back,
    or forward by more than it may (JUMP_S or 10 frames, plus the wall-clock
    time since the last packet for a paced source), has jumped (a corrupted
    timestamp, a reset): the frame is placed one frame after the last, and the
    jump is returned, to be flagged, and removed from every later frame.
    """

    JUMP_S = 1.0

    def __init__(self, paced: bool):
        self.paced = paced
        self.offset_s = 0.0  # added to the source's time
        self.last_pts_s: float | None = None
        self.last_received: float | None = None
        self._restarted = False

    def restart(self) -> None:
        """The source's clock starts again on purpose (a file loops): go on one frame later, no jump."""
        self._restarted = True

    def place(self, source_pts_s: float | None, received: float, gap_s: float, frame_s: float) -> tuple[float, float]:
        """(pts_s, jump_s) of a frame whose packet left the demuxer at monotonic `received`."""
        last, jump_s = self.last_pts_s, 0.0
        if last is None:
            pts_s = 0.0 if source_pts_s is None else source_pts_s + self.offset_s
        elif gap_s or self._restarted or source_pts_s is None:
            pts_s = last + max(frame_s, gap_s)
        else:
            raw = source_pts_s + self.offset_s
            # How far pts may move on: by the wall clock for a paced source (it may move less: the consumer was
            # late and the frames were buffered), by a few frames for a file read as fast as it decodes.
            allowed_s = max(self.JUMP_S, 10 * frame_s)
            if self.paced and self.last_received is not None:
                allowed_s += max(0.0, received - self.last_received)
            if raw <= last or raw - last > allowed_s:
                pts_s, jump_s = last + frame_s, raw - (last + frame_s)
            else:
                pts_s = raw
        if source_pts_s is not None:
            self.offset_s += pts_s - (source_pts_s + self.offset_s)
        self._restarted = False
        self.last_pts_s, self.last_received = pts_s, received
        return pts_s, jump_s


class FreezeDetector:
    """Whether a live picture has stopped changing: a 16x9 thumbnail equal (mean |difference| < 1 grey level)
    to the last one for `after_s` of frames. A frozen capture card or screen repeats the same image."""

    def __init__(self, after_s: float, fps: float):
        self.frames_needed = max(2, round(after_s * fps))
        self.same = 0
        self._last: np.ndarray | None = None

    def update(self, image: np.ndarray) -> bool:
        # Every 8th pixel is plenty for a 16x9 thumbnail and spares an area-average of every pixel of every frame.
        thumbnail = cv2.resize(image[::8, ::8], (16, 9), interpolation=cv2.INTER_AREA).astype(np.int16)
        if self._last is not None and np.abs(thumbnail - self._last).mean() < 1.0:
            self.same += 1
        else:
            self.same = 0
        self._last = thumbnail
        return self.same >= self.frames_needed


class AVSource:
    """One stream read with PyAV; implements streamd.pipeline.stage.Source.

    live: the kind's (files False, the rest True).
    frozen_after_s: flag frames as frozen once the picture has not changed for this long (None: never).
    model_hw: the model's input (H, W) for a stream that is not recorded: each frame is converted and scaled
    to the letterbox's size in one swscale pass, never made at full size (None: full-size BGR frames).
    thread_type: the decoder's threading, default "AUTO" (frame + slice) for
    files and "SLICE" for live sources, where frame threading would add a
    frame of latency per thread.
    Counted in `metrics`: opens, loops, corrupt_packets.
    """

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        kind: SourceKind,
        metrics: Metrics,
        format: str | None = None,
        options: dict[str, str] | None = None,
        realtime: bool = False,
        loop: bool = False,
        timeout_s: float = 5.0,
        backoff: Backoff = Backoff(),
        frozen_after_s: float | None = None,
        model_hw: tuple[int, int] | None = None,
        thread_type: str | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.url = url
        self.kind = kind
        self.live = kind.live
        self.metrics = metrics
        self.format = format
        self.options = dict(options or {})
        self.realtime = realtime
        self.loop = loop
        self.timeout_s = timeout_s
        self.backoff = backoff
        self.model_hw = model_hw
        # Frame threading holds back one frame per extra thread (up to 16 on a big machine): fine for a
        # file's throughput, not for a live feed that must be out within a frame's time. Live sources
        # thread within a frame (slices) instead.
        self.thread_type = thread_type or ("SLICE" if self.live else "AUTO")
        self.frames = 0  # frames read so far: the next frame's seq
        self.fps = DEFAULT_FPS
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[tuple[av.VideoFrame, float]] | None = None
        self._timeline = TimeLine(paced=self.live or realtime)
        self._freeze = FreezeDetector(frozen_after_s, self.fps) if frozen_after_s is not None else None
        self._last_frame_at: float | None = None  # monotonic: when the last frame's packet arrived
        self._lost_at: float | None = None  # monotonic: the last frame before the source was closed
        self._clock: tuple[float, float] | None = None  # realtime pacing: (monotonic, pts_s) of the anchor frame

    def __repr__(self) -> str:
        return f"AVSource({self.stream_id!r}, {self.url!r}, kind={self.kind!r}, live={self.live})"

    def _error(self, what: str, exc: BaseException | None = None) -> SourceError:
        detail = f": {exc}" if exc is not None else ""
        return SourceError(f"stream {self.stream_id!r} ({self.url}): {what}{detail}")

    def open(self) -> None:
        """Connect (or reopen after a failure); raises SourceError within about timeout_s."""
        self.close()
        started = time.monotonic()
        try:
            container = av.open(
                self.url, format=self.format, container_options=self.options, timeout=(self.timeout_s, self.timeout_s)
            )
        except av.error.ProtocolNotFoundError as exc:
            scheme = urlsplit(self.url).scheme
            raise self._error(f"this FFmpeg build (PyAV {av.__version__}) has no {scheme}:// protocol", exc) from exc
        except (av.error.ExitError, av.error.TimeoutError) as exc:
            raise self._error(f"no data for {float(self.timeout_s)} s") from exc
        except (av.error.FFmpegError, OSError) as exc:
            if self.kind is SourceKind.FILE:  # retrying cannot make a missing or broken file readable
                raise FatalError(f"stream {self.stream_id!r} ({self.url}): cannot open: {exc}") from exc
            if time.monotonic() - started >= self.timeout_s:
                raise self._error(f"no data for {float(self.timeout_s)} s", exc) from exc
            raise self._error("cannot open", exc) from exc
        if not container.streams.video:
            container.close()
            error = self._error("has no video stream")
            raise FatalError(str(error)) if self.kind is SourceKind.FILE else error
        stream = container.streams.video[0]
        stream.codec_context.thread_type = self.thread_type
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate and rate > 0 else DEFAULT_FPS
        self._container = container
        self._frames = self._decode(container, stream)
        self._clock = None
        self.metrics.count(self.stream_id, "opens")
        log.info("stream %r: opened %s (%s %dx%d, %.3g fps)", self.stream_id, self.url,
                 stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, self.fps)

    def _decode(
        self, container: av.container.InputContainer, stream: av.VideoStream
    ) -> Iterator[tuple[av.VideoFrame, float]]:
        """Decoded frames with the monotonic time their packet left the demuxer; restarts when looping."""
        while True:
            for packet in container.demux(stream):
                received = time.monotonic()
                if packet.is_corrupt:
                    self.metrics.count(self.stream_id, "corrupt_packets")
                    continue
                try:
                    frames = packet.decode()  # the final empty packet flushes the decoder
                except av.error.InvalidDataError as exc:
                    self.metrics.count(self.stream_id, "corrupt_packets")
                    log.debug("stream %r: skipped a corrupt packet: %s", self.stream_id, exc)
                    continue
                for frame in frames:
                    yield frame, received
            if not self.loop:
                return
            container.seek(0)
            stream.codec_context.flush_buffers()  # leave the draining state the flush packet put it in
            self.metrics.count(self.stream_id, "loops")
            self._timeline.restart()  # the file's clock starts again: not a jump

    def read(self) -> Frame | None:
        """The next frame; None at the end of a file; SourceError when a live stream fails or ends."""
        if self._frames is None:
            raise self._error("read() without a successful open()")
        try:
            av_frame, received = next(self._frames)
            image, source_hw, scale = self._convert(av_frame)
        except StopIteration:
            if self.live:
                self._frames = None
                raise self._error("the stream ended") from None
            return None  # the exhausted generator keeps answering None
        except (av.error.ExitError, av.error.TimeoutError) as exc:
            self._frames = None
            raise self._error(f"no data for {float(self.timeout_s)} s") from exc
        except (av.error.FFmpegError, OSError) as exc:
            self._frames = None
            raise self._error("read failed", exc) from exc
        decode_ms = (time.monotonic() - received) * 1000.0
        gap_s = 0.0
        if self._lost_at is not None:  # the first frame after a reopen: the outage is this frame's gap
            gap_s, self._lost_at = max(0.0, received - self._lost_at), None
            log.warning("stream %r: frames again after %.1f s without any (a new segment starts)", self.stream_id, gap_s)
        pts_s, jump_s = self._timeline.place(av_frame.time, received, gap_s, 1.0 / self.fps)
        if jump_s:
            log.warning("stream %r: its clock jumped by %+.3f s at frame %d; pts kept continuous",
                        self.stream_id, jump_s, self.frames)
        if self.realtime:
            self._pace(pts_s)
        frame = Frame(
            stream_id=self.stream_id,
            seq=self.frames,
            pts_s=pts_s,
            image=image,
            decoded_at=time.time(),
            decode_ms=decode_ms,
            fps=self.fps,
            gap_s=gap_s,
            pts_jump_s=jump_s,
            frozen=self._freeze.update(image) if self._freeze is not None else False,
            source_hw=source_hw,
            scale=scale,
        )
        self._last_frame_at = received
        self.frames += 1
        return frame

    def _pace(self, pts_s: float) -> None:
        """Sleep until the frame is due at the file's own rate (restart the clock when far behind)."""
        now = time.monotonic()
        if self._clock is None or now - (self._clock[0] + pts_s - self._clock[1]) > _REALTIME_MAX_LAG_S:
            self._clock = (now, pts_s)
            return
        due = self._clock[0] + pts_s - self._clock[1]
        if due > now:
            time.sleep(due - now)

    def _convert(self, av_frame: av.VideoFrame) -> tuple[np.ndarray, tuple[int, int] | None, float]:
        """The frame as uint8 BGR: full size, or (model_hw set) scaled for the model by swscale in the same pass.

        The scaled size is the letterbox's own (int(h * r), int(w * r)), r = min(H / h, W / w), so the letterbox
        only pads it; returns (image, source (H, W) or None, r).
        """
        height, width = av_frame.height, av_frame.width
        if self.model_hw is not None:
            scale = min(self.model_hw[0] / height, self.model_hw[1] / width)
            if scale < 1.0:
                size = (int(width * scale), int(height * scale))
                image = av_frame.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA")
                return image, (height, width), scale
        return av_frame.to_ndarray(format="bgr24"), None, 1.0

    def close(self) -> None:
        self._frames = None
        if self._last_frame_at is not None and self._lost_at is None:
            self._lost_at = self._last_frame_at  # if it opens again, the frames in between are a gap
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except (av.error.FFmpegError, OSError) as exc:
                log.warning("stream %r: error closing %s: %s", self.stream_id, self.url, exc)
