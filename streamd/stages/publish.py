"""ZeroMQ PUB (DESIGN contract 2): one socket per daemon, multipart [stream id, JSON message].

The socket is created in `setup()` and used by one thread only (the
runner's publisher worker): ZeroMQ sockets are not thread-safe. Sends use
NOBLOCK, so a slow subscriber never stalls the pipeline: a message ZeroMQ
will not take is counted as dropped. (PUB itself discards messages for a
subscriber past SNDHWM without an error; subscribers see that as a gap in
`seq`, which `streamd listen` reports.)

With `publish.curve` the socket is a CURVE server: messages are encrypted,
and a `ThreadAuthenticator` (ZeroMQ's ZAP handler, on the process's one
context) lets in only the client keys of the allow-list folder. It is
started before the socket binds and stopped after the socket closes: a CURVE
server with no ZAP handler admits any client key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from streamd.checks import Finding
from streamd.config import CurveConfig, PublishConfig
from streamd.config_outputs import MAX_SUBSCRIPTION_BYTES
from streamd.errors import OutputError
from streamd.keys import KeyFileError, read_authorized_keys, read_key_pair
from streamd.ops.metrics import Metrics
from streamd.types import FrameResult, Heartbeat, TrackReport

log = logging.getLogger(__name__)

COUNTERS = {  # per stream, declared to the run's Metrics
    "published": "Messages handed to ZeroMQ.",
    "publish_dropped": "Messages ZeroMQ refused at its high-water mark.",
}

MAX_LOGGED_STRANGERS = 100  # distinct refused keys logged; past that, refusals go on silently


class AllowList:
    """The authenticator's CURVE credentials provider: True for a key of the allow-list; each stranger logged once.

    keys: Z85 public keys (40 bytes), read from `folder` at setup.
    Called in the authenticator's thread only.
    """

    def __init__(self, keys: frozenset[bytes], folder: Path):
        self.keys = keys
        self.folder = folder
        self.refused: set[bytes] = set()

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys:
            return True
        if client_key not in self.refused and len(self.refused) < MAX_LOGGED_STRANGERS:
            self.refused.add(client_key)
            log.warning("refused a subscriber whose CURVE key %s is not in %s", client_key.decode(), self.folder)
        return False


def curve_server(context: zmq.Context, socket: zmq.Socket, curve: CurveConfig) -> ThreadAuthenticator:
    """Make `socket` (not yet bound) a CURVE server that admits only the keys in curve.authorized_clients_dir.

    Reads the key files (KeyFileError when one is missing, malformed or open
    to other users), then starts the ZAP handler on `context`. Returns the
    running authenticator: stop it after the socket is closed.
    """
    keys = read_key_pair(curve.server_secret_key_file)
    allowed = read_authorized_keys(curve.authorized_clients_dir)
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    authenticator = ThreadAuthenticator(context, log=log.getChild("zap"))
    try:
        authenticator.start()
    except zmq.ZMQError as exc:  # one ZAP handler per context: another one already runs
        authenticator.stop()
        raise OutputError(f"publish: cannot start the CURVE authenticator: {exc}") from exc
    authenticator.configure_curve_callback("*", AllowList(allowed, curve.authorized_clients_dir))
    return authenticator


class PublishStage:
    """FrameResult, TrackReport, Heartbeat -> one ZeroMQ message [topic, item.message] (the bytes encoded once).

    A sink: process() yields nothing. Counts `published` and `publish_dropped` in metrics.

    context: the process's one zmq.Context, owned by the caller.
    sndhwm: ZMQ_SNDHWM, messages queued per subscriber; linger_ms: ZMQ_LINGER at close.
    curve: the keys and the allow-list, or None for plaintext.
    """

    name = "publish"

    def __init__(self, context: zmq.Context, config: PublishConfig, metrics: Metrics):
        self.context = context
        self.bind = config.bind
        self.sndhwm = config.sndhwm
        self.linger_ms = config.linger_ms
        self.curve = config.curve
        self.metrics = metrics
        metrics.declare(COUNTERS)
        self.socket: zmq.Socket | None = None
        self.authenticator: ThreadAuthenticator | None = None

    def check(self) -> Iterator[Finding]:
        """The endpoint binds now, and the CURVE key files read (streamd.checks.Checked)."""
        if why := unbindable(self.context, self.bind):
            yield Finding(("bind",), why, environment=True)
        if self.curve is not None:
            for field, read in (("server_secret_key_file", read_key_pair), ("authorized_clients_dir", read_authorized_keys)):
                try:
                    read(getattr(self.curve, field))
                except KeyFileError as exc:
                    yield Finding(("curve", field), str(exc))

    def setup(self) -> None:
        socket = self.context.socket(zmq.PUB)
        try:
            socket.setsockopt(zmq.SNDHWM, self.sndhwm)
            socket.setsockopt(zmq.LINGER, self.linger_ms)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)  # a subscriber cannot make it buffer more
            socket.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT binds (IPv4 endpoints are unchanged)
            if self.curve is not None:  # the ZAP handler runs before the first client can connect
                self.authenticator = curve_server(self.context, socket, self.curve)
            try:
                socket.bind(self.bind)
            except zmq.ZMQError as exc:
                raise OutputError(f"publish: cannot bind {self.bind}: {exc}") from exc
        except BaseException:
            socket.close(linger=0)
            self._stop_authenticator()
            raise
        self.socket = socket
        security = f"CURVE, clients from {self.curve.authorized_clients_dir}" if self.curve else "plaintext"
        log.info("publishing on %s (%s; SNDHWM %d, LINGER %d ms)", self.bind, security, self.sndhwm, self.linger_ms)

    def process(self, item: FrameResult | TrackReport | Heartbeat) -> tuple[()]:
        """Send [topic, message]: a result's and a track event's on their stream id, a heartbeat's on _heartbeat
        (counted for no stream)."""
        if self.socket is None:
            raise OutputError("publish: process() before setup()")
        stream_id = item.stream_id
        try:
            self.socket.send_multipart([item.topic.encode(), item.message], flags=zmq.NOBLOCK)
        except zmq.Again:
            if isinstance(item, FrameResult):
                self.metrics.count(stream_id, "publish_dropped")
        except zmq.ZMQError as exc:
            raise OutputError(f"publish: send on {self.bind} failed: {exc}") from exc
        else:
            if isinstance(item, FrameResult):
                self.metrics.count(stream_id, "published")
                self.metrics.delivered(stream_id)
        return ()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=self.linger_ms)
            self.socket = None
        self._stop_authenticator()

    def _stop_authenticator(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def unbindable(context: zmq.Context, endpoint: str) -> str | None:
    """Why a PUB socket could not bind `endpoint` now, or None (the socket, on the process's context, is closed
    again at once)."""
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.IPV6, 1)  # as PublishStage binds it
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        return f"cannot bind {endpoint}: {exc}"
    finally:
        socket.close(linger=0)
    return None

