"""The `streamd` command: validate a config, run the daemon, listen to its messages, print the schema, make keys.

Exit codes: 0 done; 1 a fatal error while loading or running, or a stream
that ended with an error while the others ran on (one line on stderr); 2 an
invalid config (every problem, each with file:line: field).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import jsonschema
import typer
import zmq
from rich.console import Console
from zmq.utils.monitor import recv_monitor_message

from streamd.config import StreamdConfig, load_config
from streamd.errors import ConfigError, StreamdError
from streamd.keys import KeyFileError, generate, read_key_pair, read_public_key
from streamd.messages import SCHEMA_FILES, TRACK_SCHEMA_ID
from streamd.messages import schema as message_schema
from streamd.model.bundle import load_bundle
from streamd.ops.logging import setup_logging
from streamd.ops.metrics import summary_table
from streamd.ops.systemd import SystemdNotifier
from streamd.redact import redact
from streamd.types import HEARTBEAT_TOPIC

app = typer.Typer(
    name="streamd",
    help="Real-time YOLOX detection on live video: recordings, detection logs and ZeroMQ messages.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
keys_app = typer.Typer(
    help="CURVE key pairs: the daemon's, and one per subscriber (docs/operations.md, 'CURVE keys').",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
log = logging.getLogger("streamd")

EXIT_FATAL = 1
EXIT_CONFIG = 2
MAX_TIMEOUT_S = 366 * 86400.0  # `listen --timeout-s`: a year, whose milliseconds zmq_poll's timeout still holds


def _fail(message: str, code: int) -> typer.Exit:
    """Print the error without a traceback (and without a source URL's credentials); return the Exit to raise."""
    typer.echo(redact(message), err=True)
    return typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n"))


def _load(config_path: Path) -> StreamdConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None


def _preflight(cfg: StreamdConfig, config: Path) -> None:
    """Everything `run` would fail on before its first frame (streamd.preflight), every problem listed: exit 2
    when the config is at fault, 1 when only the machine is (a taken port, a folder not writable now)."""
    from streamd.preflight import preflight  # it loads the model and the media stack

    problems = preflight(cfg, config)
    if problems:
        code = EXIT_FATAL if all(p.environment for p in problems) else EXIT_CONFIG
        raise _fail("\n".join(p.text for p in problems), code)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="The daemon's YAML config.")]) -> None:
    """Check a config and everything `run` would need from it (the bundle and its model, encoders, folders,
    the bind); list every problem with its YAML line and field (exit 2), as `run` would refuse it."""
    cfg = _load(config)
    _preflight(cfg, config)
    bundle = load_bundle(cfg.model)
    outputs = [
        f"{s.id} ({s.kind.value}{', record' if s.record and s.record.enabled else ''}"
        f"{', detection_log' if s.detection_log and s.detection_log.enabled else ''})"
        for s in cfg.streams
    ]
    publish = cfg.publish.bind if cfg.publish and cfg.publish.enabled else "off"
    typer.echo(
        f"{config}: OK: model {bundle.meta.name} ({bundle.sha256[:12]}), backend {cfg.backend.type}, "
        f"{len(cfg.streams)} stream(s): {', '.join(outputs)}; publish {publish}"
    )


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="The daemon's YAML config.")],
    max_frames: Annotated[Optional[int], typer.Option(min=1, help="Stop each stream after N frames.")] = None,
    duration_s: Annotated[Optional[float], typer.Option(min=0.0, help="Stop after S seconds.")] = None,
) -> None:
    """Run the pipeline until the sources end, a limit is reached, or SIGINT/SIGTERM (then drain and exit 0)."""
    cfg = _load(config)
    _preflight(cfg, config)
    from streamd.pipeline.daemon import run_pipeline  # after validation: it imports the media stack
    setup_logging(cfg.logging.level)
    notifier = SystemdNotifier()
    stop = threading.Event()
    signals: list[str] = []

    def on_signal(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if signals:
            log.warning("%s: already stopping (draining in-flight frames)", name)
            return
        signals.append(name)
        log.info("%s: stopping", name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    notifier.status("loading the model")
    try:
        summary = run_pipeline(cfg, stop, max_frames=max_frames, duration_s=duration_s, notifier=notifier)
    except ConfigError as exc:
        notifier.stopping()
        raise _fail(str(exc), EXIT_CONFIG) from None
    except StreamdError as exc:
        notifier.stopping()
        raise _fail(f"streamd: {_one_line(exc)}", EXIT_FATAL) from None
    if signals and summary.stopped_by == "stop":
        summary = dataclasses.replace(summary, stopped_by=signals[0])
    notifier.stopping(f"stopped by {summary.stopped_by}")
    console = Console(width=None if sys.stdout.isatty() else 220)  # logs: never cut the table
    console.print(summary_table(summary))
    if summary.error:
        raise _fail(f"streamd: {_one_line(summary.error)}", EXIT_FATAL)
    if summary.failed_streams:
        failed = "; ".join(f"{s.stream_id}: {_one_line(s.end_error)}" for s in summary.failed_streams)
        raise _fail(f"streamd: stream(s) ended with an error (the others ran on): {failed}", EXIT_FATAL)


@app.command()
def listen(
    endpoint: Annotated[str, typer.Argument(help="Where the daemon publishes, e.g. tcp://127.0.0.1:5555.")],
    stream: Annotated[Optional[list[str]], typer.Option("--stream", help="Only this stream id (repeatable).")] = None,
    raw_json: Annotated[bool, typer.Option("--json", help="Print each message as its raw JSON line.")] = False,
    count: Annotated[Optional[int], typer.Option(min=1, help="Exit after N messages.")] = None,
    heartbeats: Annotated[bool, typer.Option(
        "--heartbeats", help="Also print the daemon's heartbeat (its state and each stream's, once a second).",
    )] = False,
    timeout_s: Annotated[Optional[float], typer.Option(
        min=0.0, max=MAX_TIMEOUT_S, help="Exit after S seconds without a message (at most a year).",
    )] = None,
    curve_server_key: Annotated[Optional[Path], typer.Option(
        help="The daemon's public key file (NAME.key), when it publishes with curve; needs --curve-client-key.",
    )] = None,
    curve_client_key: Annotated[Optional[Path], typer.Option(
        help="This subscriber's secret key file (NAME.key_secret, mode 0600), whose NAME.key is in the daemon's "
        "authorized_clients_dir; needs --curve-server-key.",
    )] = None,
) -> None:
    """Subscribe to a daemon's detections: one line per message, and the missed seq numbers per stream.

    Exits 0 after --count messages, after --timeout-s of silence (1 if nothing
    came at all), or on Ctrl-C; a summary of received/missed goes to stderr.
    Exits 1 at once when the daemon refuses this subscriber's CURVE key, and 2
    for a bad argument or key file.
    """
    if (curve_server_key is None) != (curve_client_key is None):
        raise _fail("listen: --curve-server-key and --curve-client-key go together (CURVE needs both)", EXIT_CONFIG)
    try:
        server_key = None if curve_server_key is None else read_public_key(curve_server_key)
        client_keys = None if curve_client_key is None else read_key_pair(curve_client_key)
    except KeyFileError as exc:
        raise _fail(f"listen: {exc}", EXIT_CONFIG) from None
    wanted = set(stream or ())
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.RECONNECT_IVL, 50)  # join a daemon that starts after us quickly
    socket.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT connects (IPv4 endpoints are unchanged)
    if server_key is not None and client_keys is not None:
        socket.curve_serverkey = server_key
        socket.curve_publickey = client_keys.public
        socket.curve_secretkey = client_keys.secret
    for topic in sorted(wanted) or [""]:
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if wanted:
        socket.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC.encode())  # the daemon's state comes whatever the streams
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)  # fmt: skip
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        socket.disable_monitor()
        monitor.close()
        socket.close()
        context.term()
        raise _fail(f"listen: cannot connect to {endpoint!r}: {exc} (expected e.g. tcp://127.0.0.1:5555)", EXIT_CONFIG) from None
    typer.echo(f"listening on {endpoint}", err=True)  # a readiness line for scripts (the daemon may start later)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    received: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    malformed = 0
    last_seq: dict[str, int] = {}
    timed_out = refused = handshake_warned = False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while count is None or sum(received.values()) < count:
            wait_ms = None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(wait_ms))
            if not ready:
                timed_out = True
                break
            if monitor in ready:
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZeroMQ does not retry after a refusal
                    refused = True
                    break
                if not handshake_warned:  # it retries these: say it once, and wait on
                    handshake_warned = True
                    typer.echo(f"listen: {_handshake_hint(server_key is not None)}", err=True)
                continue
            parts = socket.recv_multipart()
            if deadline is not None:
                deadline = time.monotonic() + timeout_s
            topic = parts[0].decode(errors="replace")
            if topic == HEARTBEAT_TOPIC:  # the daemon's state once a second: shown with --heartbeats, never counted
                beat, why = _parse_message(parts)
                if beat is not None and beat["schema"].startswith("streamd.heartbeat/") and heartbeats:
                    typer.echo(parts[1].decode() if raw_json else _heartbeat_line(beat), err=not raw_json)
                continue
            if wanted and topic not in wanted:  # SUBSCRIBE matches prefixes: "room1" also gets "room10"
                continue
            message, why = _parse_message(parts)
            if message is None:  # one bad message is counted and skipped; it never ends the subscriber
                malformed += 1
                typer.echo(f"{topic}: skipped a malformed message: {why}", err=True)
                continue
            if message["schema"] == TRACK_SCHEMA_ID:  # a track confirmed or ended: shown, not a frame to count
                typer.echo(parts[1].decode() if raw_json else _track_line(message))
                continue
            seq = message["seq"]
            previous = last_seq.get(topic)
            if previous is not None and seq > previous + 1:
                missed[topic] += seq - previous - 1
                typer.echo(f"{topic}: missed {seq - previous - 1} message(s), seq {previous + 1}..{seq - 1}", err=True)
            elif previous is not None and seq <= previous:
                typer.echo(f"{topic}: seq went back from {previous} to {seq} (daemon restarted?)", err=True)
            last_seq[topic] = seq
            received[topic] += 1
            typer.echo(parts[1].decode() if raw_json else _message_line(message))
    except KeyboardInterrupt:
        pass
    finally:
        socket.disable_monitor()
        monitor.close()
        socket.close()
        context.term()
    for topic in sorted(received):
        typer.echo(f"{topic}: received {received[topic]}, missed {missed[topic]}", err=True)
    if malformed:
        typer.echo(f"malformed messages skipped: {malformed}", err=True)
    if refused:
        raise _fail(
            f"listen: {endpoint} refused this subscriber's key: add the public key of {curve_client_key} (its NAME.key "
            "file) to the daemon's publish.curve.authorized_clients_dir and restart the daemon", EXIT_FATAL,
        )  # fmt: skip
    if timed_out and not received:
        raise _fail(f"no message from {endpoint} within {timeout_s} s", EXIT_FATAL)


def _handshake_hint(curve: bool) -> str:
    if curve:
        return ("the CURVE handshake failed: is --curve-server-key the daemon's public key, and does the daemon "
                "publish with curve? (retrying)")  # fmt: skip
    return "the handshake failed: the daemon may publish with curve; give --curve-server-key and --curve-client-key (retrying)"


def _parse_message(parts: list[bytes]) -> tuple[dict | None, str]:
    """The message of [topic, json] if it is valid against its own schema version, else (None, why)."""
    if len(parts) != 2:
        return None, f"{len(parts)} frames (expected [topic, json])"
    try:
        text = parts[1].decode("utf-8")
    except UnicodeDecodeError as exc:  # json.loads would guess UTF-16 or -32 from the first bytes
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        message = json.loads(text)
    except RecursionError:
        return None, "not JSON that can be read (nested too deep)"
    except ValueError as exc:  # a syntax error, or an integer of more digits than int() converts
        return None, f"not JSON that can be read ({_one_line(exc)})"
    version = message.get("schema") if isinstance(message, dict) else None
    if version not in SCHEMA_FILES:
        return None, f"schema: {version!r} is not one of {', '.join(SCHEMA_FILES)}"
    errors = sorted(_validator(version).iter_errors(message), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(map(str, errors[0].absolute_path)) or "message"
        return None, f"{where}: {errors[0].message}"
    return message, ""


@functools.cache
def _validator(version: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(message_schema(version))


def _heartbeat_line(beat: dict) -> str:
    """heartbeat: running 12.0 s; eus-1 running 24.8 fps, eus-2 reconnecting"""
    streams = ", ".join(
        f"{sid} {s['state']}" + (f" {s['fps']:.1f} fps" if s["state"] in ("running", "frozen") else "")
        for sid, s in beat["streams"].items()
    )
    return f"heartbeat: {beat['state']} {beat['uptime_s']:.1f} s; {streams}"


def _message_line(message: dict) -> str:
    """eus-1 #12 pts 0.480 s  2 det: lesion#4 0.91, landmark#7? 0.72  total 12.3 ms (a track id, ? while tentative);
    a version 2 message (frozen and gap_s on the frame) and a version 3 one (stream_state) alike."""
    detections = ", ".join(
        f"{d['label']}{'' if d.get('track_id') is None else '#' + str(d['track_id'])}"
        f"{'' if d.get('confirmed', True) else '?'} {d['score']:.2f}"
        for d in message["detections"]
    )  # fmt: skip
    state = message.get("stream_state") or {"frozen": message.get("frozen"), "outages": 0}
    return (
        f"{message['stream']} #{message['seq']} pts {message['pts']:.3f} s  "
        f"{len(message['detections'])} det{': ' + detections if detections else ''}  "
        f"total {message['latency_ms']['total']:.1f} ms"
        + (" FROZEN" if state.get("frozen") else "")
        + (f" {state['state'].upper()}" if state.get("state") in ("stale", "reconnecting") else "")
        + (f" after a {message['gap_s']:.1f} s outage" if message.get("gap_s") else "")
        + (f" ({state['outages']} outage(s) so far, the last {state['last_gap_s']:.1f} s)" if state.get("outages") else "")
    )


def _track_line(message: dict) -> str:
    """eus-1 track 4 lesion confirmed at pts 1.200 s / ended: 3.4 s, 85 frames, best 0.93"""
    head = f"{message['stream']} track {message['track_id']} {message['label']} {message['event']}"
    if message["event"] == "confirmed":
        return f"{head} at pts {message['last_pts']:.3f} s"
    return f"{head}: {message['duration_s']:.1f} s, {message['frames']} frames, best {message['best_score']:.2f}"


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Argument(help="The key's name: the daemon's (e.g. eus-room-1) or a subscriber's.")],
    folder: Annotated[Path, typer.Option("--dir", help="Where to write NAME.key and NAME.key_secret (created 0700).")] = Path("."),
) -> None:
    """Write a new CURVE key pair: NAME.key (public, give it to the other side) and NAME.key_secret (mode 0600).

    Never overwrites a file. Exit 2 (nothing written) when the name is not
    allowed, a file exists, or the folder cannot be written.
    """
    try:
        public_file, secret_file = generate(name, folder)
    except KeyFileError as exc:
        raise _fail(f"keys: {exc}", EXIT_CONFIG) from None
    typer.echo(f"{public_file}: public key: give it to the other side (a subscriber's goes in authorized_clients_dir)")
    typer.echo(f"{secret_file}: secret key, mode 0600: keep it where it is, never copy it")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the detection message this daemon publishes (streamd.detections/2)."""
    typer.echo(json.dumps(message_schema(), indent=2))


@app.command()
def replay(
    sources: Annotated[list[Path], typer.Argument(help="Video files, archive segments, or folders of them.")],
    model: Annotated[list[Path], typer.Option("--model", help="A model bundle (give it once or twice: A, B).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: OUT/<model name>/ logs, report.*")],
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, tensorrt or torch (as `backend.type`).")] = "auto",
    truth: Annotated[Optional[Path], typer.Option(
        help="Ground truth, JSON lines (streamd/replay/truth.py; docs/operations.md): adds AP50 and the clinical "
        "figures.",
    )] = None,
) -> None:
    """Replay sources through one or two models on the daemon's own pipeline; compare them in OUT/report.html.

    Exits 0 with the report written, 1 on a fatal error or a stream that failed, 2 for a bad argument (a source,
    the truth file, an output folder already used), 130
    when interrupted (the logs of what was done are complete; no report).
    """
    from streamd.replay.command import EXIT_INTERRUPTED
    from streamd.replay.command import replay as run_replay
    from streamd.replay.errors import ReplayError

    setup_logging("WARNING")  # the progress bars, not the pipeline's INFO lines
    try:
        result = run_replay(sources, model, out, backend=backend, truth_path=truth)
    except (ConfigError, ReplayError) as exc:  # an argument at fault: a source, a bundle's config, the truth file
        raise _fail(f"streamd replay: {_one_line(exc)}", EXIT_CONFIG) from None
    except StreamdError as exc:
        raise _fail(f"streamd replay: {_one_line(exc)}", EXIT_FATAL) from None
    if result.interrupted:
        raise _fail("streamd replay: interrupted: the logs hold every frame done; no report", EXIT_INTERRUPTED)
    failed = "; ".join(error for run in result.runs for error in run.errors)
    if failed:
        raise _fail(f"streamd replay: {' '.join(failed.split())}", EXIT_FATAL)
    typer.echo(f"report: {result.report_json} and {result.report_html}")


if __name__ == "__main__":  # python -m streamd.cli
    app()
