"""streamd.stages.publish: a real ZeroMQ PUB on 127.0.0.1 and a real SUB; messages follow the schema."""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np
import pytest
import zmq

from streamd.errors import OutputError
from streamd.config import PublishConfig
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
    assert message["detections"] == [{"label": "landmark", "class_id": 1, "score": 0.9, "box": [10.0, 20.0, 30.0, 40.0]}]
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
