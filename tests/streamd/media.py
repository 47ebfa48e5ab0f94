"""Real media for the source and output tests: ffmpeg-made videos, live senders, an RTSP server, ffprobe.

Everything binds to 127.0.0.1 on a free port; every helper that starts a
process returns its Popen, and the caller stops exactly that process
(`stop(process)`), never one it did not start.
"""

from __future__ import annotations

import json
import random
import select
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from streamd.messages import encode_message
from streamd.model.detections import Detections
from streamd.types import Frame, FrameResult, Latency, ModelRef

MODEL = ModelRef(name="test-yolox-nano", sha256="0" * 63 + "1", class_names=("lesion", "landmark"))

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one with python3-gi and gst-rtsp-server; the venv cannot import gi

# testsrc2 with a red box sliding 4 px per frame, so that consecutive frames differ where a detector would look.
_MOVING_BOX = "[0:v][1:v]overlay=x='mod(n*4,W-w)':y='(H-h)/2':shortest=1,format=yuv420p"


def free_port(kind: str = "udp") -> int:
    """A port on 127.0.0.1 that was free a moment ago (kind: "udp" or "tcp")."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lavfi_inputs(size: tuple[int, int], fps: float, box_px: int) -> list[str]:
    width, height = size
    return [
        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}",
        "-f", "lavfi", "-i", f"color=c=red:size={box_px}x{box_px}:rate={fps}",
    ]  # fmt: skip


def make_video(
    path: Path,
    *,
    size: tuple[int, int] = (320, 240),
    fps: float = 25,
    frames: int = 50,
    codec: str = "libx264",
    gop: int | None = None,
) -> Path:
    """Write a `frames`-frame testsrc2 + moving box video; the container follows the suffix (.mp4 .mkv .ts .avi).

    size: (width, height). codec: an ffmpeg encoder name (libx264, mpeg4, mjpeg, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    box_px = max(8, min(size) // 6)
    codec_args = ["-c:v", codec]
    if codec == "libx264":
        codec_args += ["-preset", "ultrafast", "-bf", "0"]
    if gop:
        codec_args += ["-g", str(gop)]
    command = [
        FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
        *_lavfi_inputs(size, fps, box_px),
        "-filter_complex", _MOVING_BOX, "-frames:v", str(frames), *codec_args, "-an", str(path),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return path


def write_config(folder: Path, text: str) -> Path:
    """FOLDER/streamd.yaml from an indented YAML text (the tests' configs, written as a user would)."""
    path = folder / "streamd.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def encode_images(
    path: Path, images, *, fps: float = 25, codec: str = "libx264", pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None, colorspace: int | None = None,
) -> Path:  # fmt: skip
    """Encode uint8 HxWx3 BGR images into `path` with PyAV alone (the GPU machine has no ffmpeg binary).

    colorspace: the matrix the frames are tagged with and converted with (FFmpeg's AVColorSpace: 1 BT.709,
    9 BT.2020); None leaves them untagged (BT.601). libx264 gets ultrafast, no B-frames, unless `options` says.
    """
    import av

    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if colorspace is not None:
            stream.codec_context.colorspace = stream.codec_context.color_primaries = colorspace
        stream.options = options if options is not None else ({"preset": "ultrafast", "bf": "0"} if codec == "libx264" else {})
        for image in images:
            av_frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            if colorspace is not None:
                av_frame.colorspace = colorspace
            container.mux(stream.encode(av_frame))
        container.mux(stream.encode())
    return path


def corrupt_ts(folder: Path) -> Path:
    """An MPEG-TS file with 200 flipped bytes on which PyAV's demuxer raises IndexError after some good frames
    (the fault seen in the field); skips the test when no such corruption of this clip is found."""
    import av
    import av.error
    import pytest

    clean = make_video(folder / "clean.ts", size=(320, 240), fps=25, frames=100, gop=10).read_bytes()
    path = folder / "corrupt.ts"
    for seed in range(300):
        rng = random.Random(seed)
        data = bytearray(clean)
        for _ in range(200):
            data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
        frames = 0
        try:
            with av.open(str(path)) as container:
                for packet in container.demux(container.streams.video[0]):
                    try:
                        frames += len(packet.decode())
                    except av.error.InvalidDataError:
                        pass
        except IndexError:
            if frames > 0:
                return path
        except av.error.FFmpegError:
            continue
    pytest.skip("no corruption of this clip makes this PyAV raise IndexError part-way")


def udp_sender(port: int, *, size: tuple[int, int] = (320, 240), fps: float = 25, gop: int = 10) -> subprocess.Popen:
    """A live MPEG-TS/H.264 feed to udp://127.0.0.1:port, paced by -re, until stopped.

    A short GOP lets a receiver that joins mid-stream start decoding quickly.
    """
    command = [
        FFMPEG, "-hide_banner", "-loglevel", "error", "-re",
        *_lavfi_inputs(size, fps, max(8, min(size) // 6)),
        "-filter_complex", _MOVING_BOX,
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(gop), "-bf", "0",
        "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316",
    ]  # fmt: skip
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_RTSP_SERVER = textwrap.dedent(
    """
    import sys
    import gi
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    port, mount, width, height, fps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit("could not attach the RTSP server")
    print("ready", flush=True)
    GLib.MainLoop().run()
    """
)


def rtsp_available() -> str | None:
    """None when the system python can run gst-rtsp-server, else why not (a skip reason)."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0')"
    result = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
    return None if result.returncode == 0 else f"no GStreamer RTSP server for {SYSTEM_PYTHON}: {result.stderr.strip()}"


def rtsp_server(
    port: int, *, mount: str = "/test", size: tuple[int, int] = (320, 240), fps: int = 25, ready_timeout_s: float = 20
) -> subprocess.Popen:
    """A GStreamer RTSP server on rtsp://127.0.0.1:port{mount} serving live H.264; returns once it listens."""
    process = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", _RTSP_SERVER, str(port), mount, str(size[0]), str(size[1]), str(fps)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], ready_timeout_s)
    line = process.stdout.readline() if ready else ""  # "ready" once attached, "" if it died
    if line.strip() != "ready":
        process.kill()
        _, error = process.communicate(timeout=10)
        raise RuntimeError(f"RTSP server on port {port} did not start within {ready_timeout_s} s: {error.strip()}")
    return process


def stop(process: subprocess.Popen, timeout_s: float = 5) -> None:
    """Terminate one process this test started (kill it if it lingers)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    for pipe in (process.stdout, process.stderr):
        if pipe:
            pipe.close()


def _ffprobe(path: Path, *args: str) -> dict:
    command = [FFPROBE, "-v", "error", "-select_streams", "v:0", "-of", "json", *args, str(path)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)


def probe_stream(path: Path) -> dict:
    """The first video stream's ffprobe fields (codec_name, width, height, pix_fmt, avg_frame_rate, ...)."""
    return _ffprobe(path, "-show_streams")["streams"][0]


def probe_codec(path: Path) -> str:
    """The first video stream's codec name (h264, mpeg4, ...)."""
    return _ffprobe(path, "-show_entries", "stream=codec_name")["streams"][0]["codec_name"]


def probe_frame_count(path: Path) -> int:
    """Frames actually decodable in the first video stream (ffprobe -count_frames)."""
    stream = _ffprobe(path, "-count_frames", "-show_entries", "stream=nb_read_frames")["streams"][0]
    return int(stream.get("nb_read_frames", 0) or 0)


def probe_pts(path: Path) -> list[float]:
    """Presentation times in seconds of the first video stream's frames, in decode output order."""
    frames = _ffprobe(path, "-show_entries", "frame=pts_time,best_effort_timestamp_time")["frames"]
    return [float(f.get("pts_time", f.get("best_effort_timestamp_time"))) for f in frames]


def probe_duration(path: Path) -> float:
    """Container duration in seconds (falls back to the stream's)."""
    data = _ffprobe(path, "-show_entries", "format=duration:stream=duration")
    value = data.get("format", {}).get("duration") or data["streams"][0].get("duration")
    return float(value)


def synthetic_frames(
    count: int, *, size: tuple[int, int] = (160, 120), fps: float = 25, stream_id: str = "eus-1",
    pts_s: Iterable[float] | None = None, start_time: float = 1_800_000_000.0,
) -> Iterator[Frame]:
    """`count` frames with a moving bright square; pts n/fps unless given; decoded_at 1/fps apart from start_time."""
    width, height = size
    times = list(pts_s) if pts_s is not None else [n / fps for n in range(count)]
    for seq, pts in enumerate(times[:count]):
        image = np.full((height, width, 3), 60, np.uint8)
        x = (seq * 4) % max(1, width - 16)
        image[height // 2 - 8 : height // 2 + 8, x : x + 16] = (40, 200, 240)
        yield Frame(stream_id, seq, float(pts), image, decoded_at=start_time + seq / fps, decode_ms=1.0, fps=fps)


def frame_result(frame: Frame, detections: Detections | None = None) -> FrameResult:
    """The frame with detections (default: one box in the middle, class 0) as inference would return it."""
    if detections is None:
        w, h = frame.width, frame.height
        detections = Detections(
            np.asarray([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]], np.float32),
            np.asarray([0.9], np.float32),
            np.asarray([0], np.int64),
        )
    latency = Latency(decode_ms=frame.decode_ms, queue_ms=0.5, infer_ms=5.0, total_ms=7.0)
    return FrameResult(frame, detections, MODEL, latency, encode_message(frame, detections, MODEL, latency))
