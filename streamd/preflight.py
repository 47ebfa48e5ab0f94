"""Preflight: what `streamd run` would fail on, found before anything starts.

`streamd validate` runs it after the config validates, and so does `streamd
run` before it loads anything else, so both give the same answer and the same
exit code (2) for the same problem. Each problem names the file, the YAML
line and the field:

- model: the bundle loads (sha256 checked), ONNX Runtime loads its model,
  and the model's output fits the bundle (class names, input size);
- streams[].record: the encoder and preset exist in this FFmpeg build;
- streams[].record.dir, streams[].detection_log.dir: the folder is, or can be
  created, and is writable;
- publish.bind: the endpoint can be bound now (nothing else holds it);
- publish.curve: the server's secret key file reads and is not open to other
  users; the allow-list folder holds at least one client key and no secret
  one (streamd.keys).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.config import StreamdConfig, split_host_port
from streamd.errors import StreamdError
from streamd.keys import KeyFileError, read_authorized_keys, read_key_pair
from streamd.model.bundle import load_bundle
from streamd.model.detector import Detector
from streamd.stages.record import check_encoder
from streamd.yamlconfig import field_lines


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
        if stream.record is not None and stream.record.enabled:
            if why := check_encoder(stream.record.codec, stream.record.preset):
                problem(("streams", index, "record"), why)
            if why := unwritable(stream.record.dir):
                problem(("streams", index, "record", "dir"), why, environment=True)
        if stream.detection_log is not None and stream.detection_log.enabled:
            if why := unwritable(stream.detection_log.dir):
                problem(("streams", index, "detection_log", "dir"), why, environment=True)
    if config.metrics is not None and (why := tcp_unbindable(config.metrics.bind)):
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


def unwritable(folder: Path) -> str | None:
    """Why streamd could not write files in `folder` (creating it if need be), or None."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing}, where {folder} would be created,"
        return f"the {what} is not writable by this user (uid {os.getuid()})"
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
