"""Preflight: what `streamd run` would fail on, found before anything starts.

`streamd validate` runs it after the config validates, and so does `streamd
run` before it loads anything else, so both give the same answer and the same
exit code (2) for the same problem. Each problem names the file, the YAML
line and the field. Each source and output checks itself (`check()`,
streamd.checks.Checked, asked for every part streamd.pipeline.endpoints
builds from the config); the model and the metrics port are checked here:

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

import socket
from dataclasses import dataclass
from pathlib import Path

import zmq

from streamd.backends.base import FunctionBackend
from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.checks import Checked
from streamd.config import PublishConfig, StreamdConfig, split_host_port
from streamd.errors import StreamdError
from streamd.model.bundle import load_bundle
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.pipeline.endpoints import endpoints
from streamd.yamlconfig import field_lines

STAND_IN_HW = (32, 32)  # the model size the parts are built with when the model itself does not load


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing `run` would fail on: "file:line: field: problem", and whether the machine, not the config,
    is at fault (a taken port, a folder not writable now: systemd may retry those; a bad config it may not)."""

    text: str
    environment: bool = False


def preflight(config: StreamdConfig, config_path: Path) -> list[Problem]:
    """Every problem `run` would meet before its first frame: the model's, each part's own (streamd.checks.Checked:
    the sources and outputs the config builds, through streamd.pipeline.endpoints), and the metrics port's."""
    line = field_lines(config_path)
    problems: list[Problem] = []

    def problem(loc: tuple, text: str, environment: bool = False) -> None:
        where = f"{config_path}:{line(loc)}: {'.'.join(map(str, loc))}"
        problems.append(Problem(f"{where}: {' '.join(text.split())}", environment))

    try:
        bundle = load_bundle(config.model)
        detector = Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=1, intra_op_threads=1))
        detector.warm_up(runs=1)
    except StreamdError as exc:
        problem(("model",), str(exc))
        # The parts are still checked: only their pixel format and size come from the model, not what they check.
        detector = Detector(FunctionBackend(lambda batch: batch, STAND_IN_HW), STAND_IN_HW, ())
    context = zmq.Context()
    try:
        ends = endpoints(config, detector, Metrics([stream.id for stream in config.streams]), context)
        for section, part in ends.sections:
            if isinstance(part, Checked):
                for finding in part.check():
                    problem(section + finding.field, finding.text, finding.environment)
    finally:
        context.term()
        detector.backend.close()  # ONNX Runtime's session is not needed past the checks
    if config.metrics is not None:
        if why := shared_port(config.metrics.bind, config.publish):
            problem(("metrics", "bind"), why)
        elif why := tcp_unbindable(config.metrics.bind):
            problem(("metrics", "bind"), why, environment=True)
    return problems


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
