"""streamd.stages.publish: a real ZeroMQ PUB on 127.0.0.1 and real SUBs; messages follow the schema; CURVE admits listed keys only."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamd.config import CurveConfig, PublishConfig
from streamd.errors import OutputError
from streamd.keys import KeyFileError, generate, read_key_pair, read_public_key
from streamd.messages import encode_message, schema
from streamd.model import Detections
from streamd.ops.metrics import Metrics
from streamd.stages.publish import PublishStage
from streamd.types import Frame, FrameResult, Latency, ModelRef
from tests.streamd import media

MODEL = ModelRef("tiny-test", "ab" * 32, ("lesion", "landmark"))


def result(stream_id: str = "eus-1", seq: int = 0) -> FrameResult:
    frame = Frame(stream_id, seq, seq / 25, np.zeros((120, 160, 3), np.uint8), decoded_at=time.time() - 0.01, decode_ms=1.0)
    detections = Detections([[10, 20, 30, 40]], [0.9], [1])
    latency = Latency(decode_ms=1.0, queue_ms=2.0, infer_ms=3.0, total_ms=6.0)
    return FrameResult(frame, detections, MODEL, latency, encode_message(frame, detections, MODEL, latency))


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def publisher(context):
    metrics = Metrics(["eus-1", "eus-2"])
    config = PublishConfig(bind=f"tcp://127.0.0.1:{media.free_port('tcp')}", sndhwm=10, linger_ms=0)
    stage = PublishStage(context, config, metrics)
    stage.setup()
    yield stage
    stage.close()


def subscriber(context, endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def first_message(stage: PublishStage, sub: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    """Publish until the subscription has reached the PUB (ZeroMQ's slow joiner), then return what arrived."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        list(stage.process(result()))
        if sub.poll(50):
            return sub.recv_multipart()
    raise AssertionError("no message reached the subscriber")


def test_multipart_topic_and_a_schema_valid_payload(context, publisher):
    sub = subscriber(context, publisher.bind)
    topic, payload = first_message(publisher, sub)
    assert topic == b"eus-1"
    message = json.loads(payload)
    jsonschema.validate(message, schema())
    assert message["stream"] == "eus-1" and message["model"]["sha256"] == MODEL.sha256
    assert message["detections"] == [{"label": "landmark", "class_id": 1, "score": 0.9, "box": [10.0, 20.0, 30.0, 40.0],
                                      "track_id": None, "confirmed": True}]  # no tracker: no id, every box confirmed
    assert message["latency_ms"] == {"decode": 1.0, "queue": 2.0, "infer": 3.0, "total": 6.0}


def test_socket_options_are_the_named_ones(publisher):
    assert publisher.socket.getsockopt(zmq.SNDHWM) == 10
    assert publisher.socket.getsockopt(zmq.LINGER) == 0
    assert publisher.socket.socket_type == zmq.PUB


def test_subscribers_filter_by_stream_topic(context, publisher):
    sub = subscriber(context, publisher.bind, b"eus-2")
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        list(publisher.process(result("eus-1")))
        list(publisher.process(result("eus-2")))
        if sub.poll(50):
            got = sub.recv_multipart()
    assert got is not None and got[0] == b"eus-2"
    while sub.poll(100):
        assert sub.recv_multipart()[0] == b"eus-2"


def test_a_slow_subscriber_never_blocks_the_publisher(context, publisher):
    sub = subscriber(context, publisher.bind)
    first_message(publisher, sub)  # connected, and now never reads again
    for seq in range(5000):
        list(publisher.process(result(seq=seq)))
    summary = publisher.metrics.summary("test").stream("eus-1")
    assert summary.published + summary.publish_dropped >= 5000  # every send returned: none waited on the subscriber


def test_eagain_is_counted_as_a_drop(publisher, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise zmq.Again()

    monkeypatch.setattr(publisher.socket, "send_multipart", refuse)
    assert list(publisher.process(result())) == []
    summary = publisher.metrics.summary("test").stream("eus-1")
    assert summary.publish_dropped == 1 and summary.published == 0


def test_the_payload_is_the_results_message_bytes(publisher, monkeypatch):
    sent = []
    monkeypatch.setattr(publisher.socket, "send_multipart", lambda parts, flags: sent.append(parts))
    one = result("eus-2", seq=4)
    list(publisher.process(one))
    assert sent == [[b"eus-2", one.message]]  # encoded once at inference, sent unchanged


def test_sent_messages_are_counted(publisher):
    list(publisher.process(result("eus-2")))
    assert publisher.metrics.summary("test").stream("eus-2").published == 1


def test_a_taken_endpoint_is_an_output_error(context, publisher):
    second = PublishStage(context, PublishConfig(bind=publisher.bind), publisher.metrics)
    with pytest.raises(OutputError, match="cannot bind"):
        second.setup()


# --- CURVE: real key files, a real ZAP handler, real subscribers -----------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Key files by name (server.key, viewer.key_secret, ...) and "clients": an allow-list holding viewer.key only."""
    for name in ("server", "viewer", "stranger"):
        generate(name, tmp_path / "keys")
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(tmp_path / "keys" / "viewer.key", clients)
    return {path.name: path for path in (tmp_path / "keys").iterdir()} | {"clients": clients}


def curve_config(keys: dict[str, Path], bind: str | None = None) -> PublishConfig:
    curve = CurveConfig(server_secret_key_file=keys["server.key_secret"], authorized_clients_dir=keys["clients"])
    bind = bind or f"tcp://127.0.0.1:{media.free_port('tcp')}"
    return PublishConfig(bind=bind, sndhwm=1000, linger_ms=0, curve=curve)


def curve_subscriber(context, endpoint: str, server_key: Path, secret: Path | None) -> tuple[zmq.Socket, zmq.Socket]:
    """A SUB with the keys of `secret` (None: plaintext) and a monitor of its handshakes."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    if secret is not None:
        pair = read_key_pair(secret)
        sub.curve_serverkey = read_public_key(server_key)
        sub.curve_publickey, sub.curve_secretkey = pair.public, pair.secret
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)  # fmt: skip
    sub.connect(endpoint)
    return sub, monitor


def handshake(monitor: zmq.Socket, timeout_s: float = 5.0) -> int:
    """The first handshake event of a subscriber (succeeded, or failed and why)."""
    if not monitor.poll(int(timeout_s * 1000)):
        raise AssertionError("no handshake within the timeout")
    return recv_monitor_message(monitor)["event"]


@pytest.fixture
def curve_publisher(context, keys):
    stage = PublishStage(context, curve_config(keys), Metrics(["eus-1"]))
    stage.setup()
    yield stage
    stage.close()


def test_curve_lets_in_only_the_listed_key_and_it_gets_every_message(context, curve_publisher, keys, caplog):
    secrets = {"viewer": keys["viewer.key_secret"], "stranger": keys["stranger.key_secret"], "plaintext": None}
    subs = {name: curve_subscriber(context, curve_publisher.bind, keys["server.key"], secret)
            for name, secret in secrets.items()}  # fmt: skip
    events = {name: handshake(monitor) for name, (_, monitor) in subs.items()}  # each one really tried
    assert events["viewer"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert events["stranger"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # refused by the allow-list (ZAP 400)
    assert events["plaintext"] in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    viewer = subs["viewer"][0]
    first_message(curve_publisher, viewer)  # the subscription has reached the PUB
    while viewer.poll(100):
        viewer.recv_multipart()
    for seq in range(1, 51):
        list(curve_publisher.process(result(seq=seq)))
    seqs = []
    while len(seqs) < 50 and viewer.poll(2000):
        seqs.append(json.loads(viewer.recv_multipart()[1])["seq"])
    assert seqs == list(range(1, 51))
    for name in ("stranger", "plaintext"):
        assert not subs[name][0].poll(300), f"the {name} subscriber got a message"
    stranger_key = read_key_pair(keys["stranger.key_secret"]).public.decode()
    refusals = [r.getMessage() for r in caplog.records if "refused a subscriber" in r.getMessage()]
    assert refusals == [f"refused a subscriber whose CURVE key {stranger_key} is not in {keys['clients']}"]
    for sub, monitor in subs.values():
        sub.disable_monitor()
        monitor.close()
        sub.close()


def test_close_stops_the_authenticator_so_the_context_can_end(keys):
    context = zmq.Context()
    stage = PublishStage(context, curve_config(keys), Metrics(["eus-1"]))
    stage.setup()
    thread = stage.authenticator.thread
    assert thread.is_alive()
    stage.close()
    assert stage.authenticator is None and not thread.is_alive()
    ended = threading.Thread(target=context.term, daemon=True)
    ended.start()
    ended.join(5)
    assert not ended.is_alive(), "context.term() hangs: a socket of the authenticator was left open"


def test_a_failed_bind_leaves_no_authenticator_running(context, publisher, keys):
    before = set(threading.enumerate())
    taken = PublishStage(context, curve_config(keys, bind=publisher.bind), Metrics(["eus-1"]))
    with pytest.raises(OutputError, match="cannot bind"):
        taken.setup()
    assert taken.authenticator is None and taken.socket is None
    assert set(threading.enumerate()) == before  # the authenticator's thread was started, and has ended


def test_a_secret_key_open_to_others_fails_setup_before_any_thread_starts(context, keys):
    keys["server.key_secret"].chmod(0o644)
    before = set(threading.enumerate())
    stage = PublishStage(context, curve_config(keys), Metrics(["eus-1"]))
    with pytest.raises(KeyFileError, match="open to other users"):
        stage.setup()
    assert set(threading.enumerate()) == before and stage.socket is None
