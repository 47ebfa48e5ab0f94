"""Preflight: what `streamd run` would fail on, found before anything starts.

`streamd validate` runs it after the config validates, and so does `streamd
run` before it loads anything else, so both give the same answer and the same
exit code (2) for the same problem. Each problem names the file, the YAML
line and the field:

- model: the bundle loads (sha256 checked), ONNX Runtime loads its model,
  and the model's output fits the bundle (class names, input size);
- streams[].source: a file's first frame decodes into a picture (not 0x0);
- streams[].record: the encoder and preset exist in this FFmpeg build, and
  the encoder writes a frame into the container here (not mjpeg or rawvideo
  in mp4, not h264_nvenc without a GPU);
- streams[].record.dir, streams[].detection_log.dir, streams[].archive.dir: the folder is, or can be
  created, and is writable; a name too long or a symlink loop is the
  config's fault (exit 2), a folder not writable now the machine's;
- metrics.bind: its port is not publish.bind's, and can be bound now (as
  the server binds it: SO_REUSEADDR, so TIME-WAIT does not count);
- publish.bind: the endpoint can be bound now (nothing else holds it);
- publish.curve: the server's secret key file reads and is not open to other
  users; the allow-list folder holds at least one client key and no secret
  one (streamd.keys).
"""

from __future__ import annotations

import errno
import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import zmq

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.config import PublishConfig, SourceKind, StreamdConfig, split_host_port
from streamd.configbase import short_path
from streamd.errors import StreamdError
from streamd.keys import KeyFileError, read_authorized_keys, read_key_pair
from streamd.model.bundle import load_bundle
from streamd.model.detector import Detector
from streamd.stages.record import _CONTAINERS as RECORD_CONTAINERS  # the recorder's container -> format
from streamd.stages.record import check_encoder
from streamd.yamlconfig import field_lines

NAME_MAX = 255  # bytes in one file or folder name (Linux, every common file system)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing `run` would fail on: "file:line: field: problem", and whether the machine, not the config,
    is at fault (a taken port, a folder not writable now: systemd may retry those; a bad config it may not)."""

    text: str
    environment: bool = False


def preflight(config: StreamdConfig, config_path: Path) -> list[Problem]:
    """Every problem `run` would meet before its first frame."""
    line = field_lines(config_path)
    problems: list[Problem] = []

    def problem(loc: tuple, text: str, environment: bool = False) -> None:
        where = f"{config_path}:{line(loc)}: {'.'.join(map(str, loc))}"
        problems.append(Problem(f"{where}: {' '.join(text.split())}", environment))

    try:
        bundle = load_bundle(config.model)
        Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=1, intra_op_threads=1)).warm_up(runs=1)
    except StreamdError as exc:
        problem(("model",), str(exc))
    for index, stream in enumerate(config.streams):
        if stream.kind is SourceKind.FILE and (why := undecodable(Path(stream.source))):
            problem(("streams", index, "source"), why)
        if (record := stream.record) is not None and record.enabled:
            if why := check_encoder(record.codec, record.preset) or unrecordable(record.codec, record.container):
                problem(("streams", index, "record"), why)
            if found := unwritable(record.dir):
                problem(("streams", index, "record", "dir"), *found)
        if stream.detection_log is not None and stream.detection_log.enabled:
            if found := unwritable(stream.detection_log.dir):
                problem(("streams", index, "detection_log", "dir"), *found)
        if stream.archive is not None and stream.archive.enabled and (found := unwritable(stream.archive.dir)):
            problem(("streams", index, "archive", "dir"), *found)
    if config.metrics is not None:
        if why := shared_port(config.metrics.bind, config.publish):
            problem(("metrics", "bind"), why)
        elif why := tcp_unbindable(config.metrics.bind):
            problem(("metrics", "bind"), why, environment=True)
    if config.publish is not None and config.publish.enabled:
        if why := unbindable(config.publish.bind):
            problem(("publish", "bind"), why, environment=True)
        if (curve := config.publish.curve) is not None:
            for field, read in (("server_secret_key_file", read_key_pair), ("authorized_clients_dir", read_authorized_keys)):
                try:
                    read(getattr(curve, field))
                except KeyFileError as exc:
                    problem(("publish", "curve", field), str(exc))
    return problems


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
        with av.open(io.BytesIO(), mode="w", format=RECORD_CONTAINERS[container]) as output:
            stream = output.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            output.start_encoding()
            for packet in (*stream.encode(av.VideoFrame(64, 64, "yuv420p")), *stream.encode()):
                output.mux(packet)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        return f"{codec} cannot record {container} segments here: {exc}"
    return None


def unwritable(folder: Path) -> tuple[str, bool] | None:
    """Why streamd could not write files in `folder` (creating it if need be), and whether the machine is at
    fault (True: a folder not writable now) or the path itself (False: a name too long, a symlink loop); or None."""
    too_long = [part for part in folder.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        return f"{short_path(folder)}: a folder name of {len(os.fsencode(too_long[0]))} bytes (at most {NAME_MAX})", False
    existing = folder
    while True:
        try:
            existing.stat()
            break
        except (FileNotFoundError, NotADirectoryError):  # to be created (or under a file: said below)
            if existing.parent == existing:
                break
            existing = existing.parent
        except OSError as exc:  # ELOOP (a symlink loop), ENAMETOOLONG, EACCES on the way
            fixed = exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)
            return f"{short_path(folder)} cannot be reached: {exc.strerror}", not fixed
    if not existing.is_dir():
        return f"{existing} is not a folder", True
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing}, where {folder} would be created,"
        return f"the {what} is not writable by this user (uid {os.getuid()})", True
    return None


def shared_port(metrics_bind: str, publish: PublishConfig | None) -> str | None:
    """Why metrics.bind cannot be served beside publish.bind (the same tcp port), or None."""
    if publish is None or not publish.enabled or not publish.bind.startswith("tcp://"):
        return None
    port = split_host_port(metrics_bind)[1]
    if publish.bind.rpartition(":")[2] == port:
        return f"port {port} is publish.bind's too ({publish.bind}): give each its own port"
    return None


def tcp_unbindable(bind: str) -> str | None:
    """Why an HTTP server could not listen on HOST:PORT now, or None (the socket is closed again at once)."""
    host, port = split_host_port(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server binds (http.server sets it): connections it closed, left in TIME-WAIT after a scrape or a
        # crash, do not hold the port, so a restart at once succeeds; a listening process still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            return f"cannot listen on {bind}: {exc.strerror or exc}"
    return None


def unbindable(endpoint: str) -> str | None:
    """Why a PUB socket could not bind `endpoint` now, or None (the socket is closed again at once)."""
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.IPV6, 1)  # as PublishStage binds it
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        return f"cannot bind {endpoint}: {exc}"
    finally:
        socket.close(linger=0)
        context.term()
    return None
