"""Sources: demux and decode one video stream with PyAV into `Frame`s (BGR or yuv420p planes, pts in seconds).

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

Decoder: NVDEC or the CPU by streams[].hwaccel, threads by streams[].decoder_threads, and the pixels each
Frame carries (BGR, BGR scaled for the model, or yuv420p planes): streamd.stages.decoder. Which decoder a
stream got is logged once its first frame is out, and again after a reopen only if it changed.

Archive (streams[].archive): every packet the decoder took is also handed, untouched, to the stream's
ArchiveTap (streamd.stages.archive), with each decoded frame, so that the archive holds the frames decoded.

Failure: PyAV waits at most `timeout_s` for any open or read (its interrupt
callback), so a dead source never hangs the thread; every av.error becomes a
SourceError that names the stream and its URL. Packets the demuxer flags as
corrupt, and packets the decoder rejects, are skipped and counted
(`corrupt_packets`); successful opens and file loops are counted too, all in
the pipeline's Metrics.

Frames no stage can take: a frame the model's letterbox would give a 0-pixel
side (1920x4 into 416x416) or whose pixels do not have their layout's shape is
checked here, before it joins a batch shared with the other streams, and
skipped (counted as dropped("unfit_frame")), with one warning per size and one
stream error, not a line per frame. The stream's other frames and the other
streams go on; a file that had such frames ends as its stream's error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import av
import av.error
import numpy as np
from av.codec.hwaccel import HWAccel

from streamd.checks import Finding
from streamd.config import SourceKind, StreamConfig
from streamd.configbase import short_path
from streamd.errors import FatalError, SourceError
from streamd.model.preprocess import letterbox_hw
from streamd.ops.metrics import Metrics, dropped
from streamd.pipeline.stage import Backoff
from streamd.stages.archive import ArchiveTap
from streamd.stages.decoder import PIXEL_FORMATS, NvdecOpen, Reformatter, decoder_in_use, frame_pixels, hwaccel_for
from streamd.stages.freeze import FreezeDetector
from streamd.stages.timeline import TimeLine  # noqa: F401 (also streamd.stages.decode.TimeLine)
from streamd.types import Frame, PixelFormat, image_problem, picture_hw

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
ARRIVAL_WINDOW = 150  # frames: a live source's pace (the least received - pts) over about its last 5 s
UNFIT_FRAME = "unfit_frame"  # the drop reason of a frame no stage can take (its size or its layout)


def open_source(
    stream: StreamConfig, metrics: Metrics, *, model_hw: tuple[int, int] | None = None,
    input_hw: tuple[int, int] | None = None, pixel_format: PixelFormat = "bgr24", cuda_device: int = 0,
    options: dict[str, str] | None = None, archive: ArchiveTap | None = None,
) -> AVSource:  # fmt: skip
    """The source of a validated stream config (not opened yet: the runner calls open()).

    model_hw, pixel_format: see AVSource (compose passes one of them for streams that are not recorded).
    input_hw: the model's input (H, W), to skip frames it cannot letterbox (model_hw implies it).
    cuda_device: the GPU NVDEC decodes on (compose passes the backend's, so frames are where inference runs).
    options: extra FFmpeg options, applied last (tests, benchmarks).
    archive: the stream's archive, fed with its packets (None: not archived).
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
        pixel_format=pixel_format, hwaccel=stream.hwaccel, cuda_device=cuda_device, decoder_threads=stream.decoder_threads,
        input_hw=input_hw, archive=archive,
    )


class AVSource:
    """One stream read with PyAV; implements streamd.pipeline.stage.Source.

    live: the kind's (files False, the rest True).
    frozen_after_s: flag frames as frozen once the picture has not changed for this long (None: never).
    model_hw: the model's input (H, W) for a stream that is not recorded: each frame is converted and scaled
    to the letterbox's size in one swscale pass, never made at full size (None: full-size BGR frames).
    pixel_format: "yuv420p" hands each frame over as its planes, for a backend that converts colour and
    resizes on its device (odd-sized frames as bgr24); excludes model_hw.
    input_hw: the model's input (H, W): a frame it cannot letterbox is skipped (default: model_hw; None and no
    model_hw: only the pixels' layout is checked).
    hwaccel: auto | cuda | none (streams[].hwaccel); cuda_device: the GPU NVDEC decodes on.
    decoder_threads: the codec's thread count (None: FFmpeg's).
    thread_type: the decoder's threading, default "AUTO" (frame + slice) for
    files and "SLICE" for live sources and files paced as they are (realtime),
    where frame threading would add a frame of latency per thread.
    archive: the stream's ArchiveTap, fed with every packet the decoder took and every frame (None: none).
    Counted in `metrics`: opens, loops, corrupt_packets, dropped("unfit_frame").
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
        pixel_format: PixelFormat = "bgr24",
        hwaccel: str = "none",
        cuda_device: int = 0,
        decoder_threads: int | None = None,
        thread_type: str | None = None,
        input_hw: tuple[int, int] | None = None,
        archive: ArchiveTap | None = None,
    ) -> None:
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"stream {stream_id!r}: pixel_format must be one of {PIXEL_FORMATS}, not {pixel_format!r}")
        if model_hw is not None and pixel_format != "bgr24":
            raise ValueError(
                f"stream {stream_id!r}: model_hw (BGR scaled for the model) and pixel_format {pixel_format!r} (planes "
                "for a backend that resizes on its device) exclude each other"
            )
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
        self.input_hw = input_hw or model_hw
        self.pixel_format = pixel_format
        self.hwaccel = hwaccel
        self.cuda_device = cuda_device
        self.decoder_threads = decoder_threads
        self.archive = archive
        # Frame threading holds back one frame per extra thread (up to 16 on a big machine): fine for a
        # file's throughput, not for a live feed that must be out within a frame's time. Live sources
        # thread within a frame (slices) instead.
        self.thread_type = thread_type or ("SLICE" if self.live or realtime else "AUTO")
        self.frames = 0  # frames read so far: the next frame's seq
        self.fps = DEFAULT_FPS
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[tuple[av.VideoFrame, float]] | None = None
        self._timeline = TimeLine(paced=self.live or realtime)
        self._freeze = FreezeDetector(frozen_after_s) if frozen_after_s is not None else None
        self._last_frame_at: float | None = None  # monotonic: when the last frame's packet arrived (see _arrived)
        self._lags: deque[float] = deque(maxlen=ARRIVAL_WINDOW)  # a live source's recent (received - its pts), s
        self._lost_at: float | None = None  # monotonic: the last frame before the source was closed
        self._clock: tuple[float, float] | None = None  # realtime pacing: (monotonic, pts_s) of the anchor frame
        # The decoder to name once the first frame of an open is out: (codec context, tried NVDEC, why not).
        self._decoder_pending: tuple[av.VideoCodecContext, NvdecOpen | None, str | None] | None = None
        self._decoder_said: str | None = None  # the last line logged about it
        self._unfit: dict[str, int] = {}  # why frames were skipped (size or layout) -> how many
        self._reformat = Reformatter()  # this stream's swscale context, made once

    def __repr__(self) -> str:
        return f"AVSource({self.stream_id!r}, {self.url!r}, kind={self.kind!r}, live={self.live})"

    def _error(self, what: str, exc: BaseException | None = None) -> SourceError:
        detail = f": {exc}" if exc is not None else ""
        return SourceError(f"stream {self.stream_id!r} ({self.url}): {what}{detail}")

    def check(self) -> Iterator[Finding]:
        """A file source whose first frame does not decode into a picture (streamd.checks.Checked)."""
        if self.kind is SourceKind.FILE and (why := undecodable(Path(self.url))):
            yield Finding((), why)

    def open(self) -> None:
        """Connect (or reopen after a failure); raises SourceError within about timeout_s (twice that when NVDEC
        was tried and failed: the source is opened again for the CPU)."""
        self.close()
        self._lags.clear()  # a new connection: a new clock
        candidates, why_not = hwaccel_for(self.hwaccel, self.cuda_device)
        container, hwaccel = None, None
        for candidate in candidates:  # NVDEC on the shared CUDA context, then on one of its own
            try:
                container, hwaccel = self._open_container(candidate.hwaccel), candidate
                break
            except _NoHardwareDecoder as exc:
                why_not = f"NVDEC did not open: {exc}"
        if container is None:
            container = self._open_container(None)
        if not container.streams.video:
            container.close()
            error = self._error("has no video stream")
            raise FatalError(str(error)) if self.kind is SourceKind.FILE else error
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_type = self.thread_type
        if self.decoder_threads is not None:
            codec.thread_count = self.decoder_threads
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate and rate > 0 else DEFAULT_FPS
        self._container = container
        self._frames = self._decode(container, stream)
        self._decoder_pending = (codec, hwaccel, why_not)
        if self.archive is not None:
            self.archive.opened(stream)
        self._clock = None
        self.metrics.count(self.stream_id, "opens")
        log.info("stream %r: opened %s (%s %dx%d, %.3g fps)", self.stream_id, self.url,
                 codec.name, codec.width, codec.height, self.fps)

    def _open_container(self, hwaccel: HWAccel | None) -> av.container.InputContainer:
        """av.open with the stream's options; a failure other than a timeout raises _NoHardwareDecoder when
        hwaccel was given (the caller opens again without it), else the SourceError or FatalError it is."""
        started = time.monotonic()
        try:
            return av.open(
                self.url, format=self.format, container_options=self.options, timeout=(self.timeout_s, self.timeout_s),
                hwaccel=hwaccel,
            )
        except av.error.ProtocolNotFoundError as exc:
            scheme = urlsplit(self.url).scheme
            raise self._error(f"this FFmpeg build (PyAV {av.__version__}) has no {scheme}:// protocol", exc) from exc
        except (av.error.ExitError, av.error.TimeoutError) as exc:
            raise self._error(f"no data for {float(self.timeout_s)} s") from exc
        except (av.error.FFmpegError, OSError) as exc:
            if hwaccel is not None:  # the device, or the source itself: the open without it tells
                raise _NoHardwareDecoder(str(exc)) from exc
            if self.kind is SourceKind.FILE:  # retrying cannot make a missing or broken file readable
                raise FatalError(f"stream {self.stream_id!r} ({self.url}): cannot open: {exc}") from exc
            if time.monotonic() - started >= self.timeout_s:
                raise self._error(f"no data for {float(self.timeout_s)} s", exc) from exc
            raise self._error("cannot open", exc) from exc

    def _say_decoder(self) -> None:
        """Log which decoder the stream got (WARNING when hwaccel cuda was asked for and not had), if it changed."""
        codec, nvdec, why_not = self._decoder_pending
        self._decoder_pending = None
        what, why_not = decoder_in_use(codec, nvdec, why_not)
        line = f"stream {self.stream_id!r}: {what}" + (f" (hwaccel {self.hwaccel}: {why_not})" if why_not else "")
        if line != self._decoder_said:
            log.log(logging.WARNING if why_not and self.hwaccel == "cuda" else logging.INFO, line)
            self._decoder_said = line

    def _decode(
        self, container: av.container.InputContainer, stream: av.VideoStream
    ) -> Iterator[tuple[av.VideoFrame, float]]:
        """Decoded frames with the monotonic time their own packet left the demuxer (by pts: a decoder with frame
        threads or B-frames puts a frame out some packets later); restarts when looping."""
        arrivals: dict[int, float] = {}  # pts -> when its packet left the demuxer, until its frame is out
        while True:
            for packet in container.demux(stream):
                received = time.monotonic()
                if packet.pts is not None:
                    arrivals[packet.pts] = received
                    if len(arrivals) > 256:  # packets that gave no frame: keep the newest
                        del arrivals[next(iter(arrivals))]
                if packet.is_corrupt:
                    self.metrics.count(self.stream_id, "corrupt_packets")
                    continue
                try:
                    frames = packet.decode()  # the final empty packet flushes the decoder
                except av.error.InvalidDataError as exc:
                    self.metrics.count(self.stream_id, "corrupt_packets")
                    log.debug("stream %r: skipped a corrupt packet: %s", self.stream_id, exc)
                    continue
                if self.archive is not None and packet.size:  # not the final empty packet that flushes the decoder
                    self.archive.packet(packet)
                for frame in frames:
                    yield frame, arrivals.pop(frame.pts, received)
            if not self.loop:
                return
            container.seek(0)
            arrivals.clear()
            stream.codec_context.flush_buffers()  # leave the draining state the flush packet put it in
            self.metrics.count(self.stream_id, "loops")
            self._timeline.restart()  # the file's clock starts again: not a jump
            if self.archive is not None:
                self.archive.restart()

    def read(self) -> Frame | None:
        """The next frame; None at the end of a file; SourceError when a live stream fails or ends."""
        if self._frames is None:
            raise self._error("read() without a successful open()")
        try:
            while True:
                av_frame, received = next(self._frames)
                problem = self._size_problem(av_frame.height, av_frame.width)
                if problem is None:
                    image, layout, source_hw, scale = frame_pixels(av_frame, self.pixel_format, self.model_hw, self._reformat)
                    problem = image_problem(image, layout.format, image.dtype == np.uint8)
                if problem is None:
                    break
                self._skip(problem)
        except StopIteration:
            if self.live:
                self._frames = None
                raise self._error("the stream ended") from None
            if self._unfit:  # the file's other frames went through: its frames no stage could take are its error
                self._frames = None
                raise self._error(f"{self._unfit_text()}, skipped") from None
            return None  # the exhausted generator keeps answering None
        except (av.error.ExitError, av.error.TimeoutError) as exc:
            self._frames = None
            raise self._error(f"no data for {float(self.timeout_s)} s") from exc
        except (av.error.FFmpegError, OSError) as exc:
            self._frames = None
            raise self._error("read failed", exc) from exc
        decode_ms = (time.monotonic() - received) * 1000.0
        if self._decoder_pending is not None:
            self._say_decoder()
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
            frozen=self._freeze.update(image[: picture_hw(image, layout.format)[0]], pts_s) if self._freeze else False,
            source_hw=source_hw,
            scale=scale,
            layout=layout,
        )
        if self.archive is not None:
            self.archive.frame(frame, av_frame.pts, av_frame.key_frame)
        self._last_frame_at = self._arrived(received, av_frame.time)
        self.frames += 1
        return frame

    def _arrived(self, received: float, source_pts_s: float | None) -> float:
        """When a frame's packet came, for measuring an outage from the last frame before it: `received` (when the
        demuxer handed it over), or for a live source read late (a busy reader: its frames waited in the socket's
        buffer) the earliest its own pace allows: the least (received - pts) over its recent frames, plus its pts.
        Measured by `received` alone, an outage read 1.4 s short of 8 s on a loaded machine (5 s short of 10 s
        in the field)."""
        if not self.live or source_pts_s is None:
            return received
        self._lags.append(received - source_pts_s)
        return min(received, min(self._lags) + source_pts_s)

    def _size_problem(self, height: int, width: int) -> str | None:
        """Why a frame of this size cannot be letterboxed into the model's input, or None (also when unknown)."""
        if self.input_hw is None:
            return None
        try:
            letterbox_hw((height, width), self.input_hw)
        except ValueError as exc:
            return str(exc)
        return None

    def _skip(self, problem: str) -> None:
        """Count a frame no stage can take; warn (and count a stream error) the first time for each reason."""
        self.metrics.count(self.stream_id, dropped(UNFIT_FRAME))
        first = problem not in self._unfit
        self._unfit[problem] = self._unfit.get(problem, 0) + 1
        if first:
            text = f"stream {self.stream_id!r}: skipping the frames no stage can take: {problem}"
            log.warning(text)
            self.metrics.error(self.stream_id, text)

    def _unfit_text(self) -> str:
        """"12 frames: a 1920x4 image cannot be letterboxed into 416x416 ...", one part per reason."""
        return "; ".join(f"{n} frame{'s' if n != 1 else ''}: {problem}" for problem, n in self._unfit.items())

    def _pace(self, pts_s: float) -> None:
        """Sleep until the frame is due at the file's own rate (restart the clock when far behind)."""
        now = time.monotonic()
        if self._clock is None or now - (self._clock[0] + pts_s - self._clock[1]) > _REALTIME_MAX_LAG_S:
            self._clock = (now, pts_s)
            return
        due = self._clock[0] + pts_s - self._clock[1]
        if due > now:
            time.sleep(due - now)

    def close(self) -> None:
        self._frames = None
        if self.archive is not None:
            self.archive.close()
        self._decoder_pending = None  # holds the closed container's codec context
        if self._last_frame_at is not None and self._lost_at is None:
            self._lost_at = self._last_frame_at  # if it opens again, the frames in between are a gap
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except (av.error.FFmpegError, OSError) as exc:
                log.warning("stream %r: error closing %s: %s", self.stream_id, self.url, exc)


class _NoHardwareDecoder(Exception):
    """av.open with a HWAccel failed for a reason other than a timeout: the device, or the source itself."""


def undecodable(source: Path) -> str | None:
    """Why the first frame of a file source does not decode into a picture (a 0x0 video, no video stream, data
    FFmpeg cannot read), or None: such a file would run 0 frames and end as if it had played."""
    size = "?"
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                return f"{short_path(source)} has no video stream"
            stream = container.streams.video[0]
            size = f"{stream.codec_context.width}x{stream.codec_context.height}"
            for frame in container.decode(stream):
                if frame.width == 0 or frame.height == 0:
                    return f"{short_path(source)}: its first frame is {frame.width}x{frame.height}"
                return None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        return f"{short_path(source)}: its first frame does not decode ({size} video): {exc}"
    return f"{short_path(source)}: no frame of its {size} video decodes"
