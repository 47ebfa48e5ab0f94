"""Peers of the daemon's PUB socket that it must survive, and the IPv6 loopback it must serve.

The daemon is a real `streamd run` subprocess publishing a looping clip;
the hostile peer speaks ZMTP 3.0 by hand over a TCP socket on 127.0.0.1, so
it can announce a subscription of any size and send as much of it as the
daemon takes.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from streamd.cli import app
from streamd.config import PublishConfig
from streamd.config_outputs import MAX_SUBSCRIPTION_BYTES
from streamd.ops.metrics import Metrics
from streamd.stages.publish import unbindable
from streamd.stages.publish import PublishStage
from tests.streamd import media


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def zmtp_sub_greeting(peer: socket.socket) -> None:
    """Greet a ZeroMQ PUB as a ZMTP 3.0 SUB with the NULL mechanism (RFC 23): greeting, then READY both ways."""
    peer.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)
    received = b""
    while len(received) < 64:
        received += peer.recv(64 - len(received))
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB"
    peer.sendall(b"\x04" + bytes([len(body)]) + body)


def received_messages(sub: zmq.Socket, count: int, timeout_s: float = 60) -> int:
    """How many of `count` messages arrive on `sub`, each within timeout_s of the previous one."""
    got = 0
    while got < count and sub.poll(timeout_s * 1000):
        sub.recv_multipart()
        got += 1
    return got


def test_a_huge_subscription_is_refused_and_the_daemon_keeps_publishing(tmp_path: Path, tiny_bundle, clip):
    """Two 150 MB subscriptions took the daemon from 210 MiB to 3.3 GB: now it hangs up at the frame's header."""
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: onnxruntime
        streams: [{{id: a, source: {clip}, loop: true, realtime: true}}]
        publish: {{bind: "{endpoint}"}}
        """,
    )
    daemon = subprocess.Popen([Path(sys.executable).with_name("streamd"), "run", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"a")
    sub.connect(endpoint)
    try:
        assert received_messages(sub, 5, timeout_s=120) == 5, "the daemon never published"
        before = rss_bytes(daemon.pid)
        announced = 150 * 2**20
        for _ in range(2):
            sent = 0
            with socket.create_connection(("127.0.0.1", int(endpoint.rpartition(":")[2])), timeout=30) as peer:
                zmtp_sub_greeting(peer)
                peer.sendall(b"\x02" + struct.pack(">Q", announced) + b"\x01")  # a message frame: subscribe to...
                chunk = b"x" * 2**20
                try:
                    while sent < announced:
                        peer.sendall(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon hung up: what it should do
            assert sent < announced // 2, f"the daemon took {sent} bytes of a {announced}-byte subscription"
        assert rss_bytes(daemon.pid) - before < 64 * 2**20
        assert received_messages(sub, 20) == 20  # it goes on publishing to the subscriber that behaves
        assert daemon.poll() is None
    finally:
        sub.close()
        context.term()
        media.stop(daemon)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_publish_and_listen_on_the_ipv6_loopback():
    endpoint = f"tcp://[::1]:{media.free_port('tcp')}"
    context = zmq.Context()
    try:
        assert unbindable(context, endpoint) is None  # what validate checks
    finally:
        context.term()
    context = zmq.Context()
    stage = PublishStage(context, PublishConfig(bind=endpoint, linger_ms=0), Metrics(["a"]))
    stage.setup()
    assert stage.socket.getsockopt(zmq.MAXMSGSIZE) == MAX_SUBSCRIPTION_BYTES
    done = threading.Event()

    def publish() -> None:  # until the listener has what it came for (ZeroMQ's slow joiner)
        frames = media.synthetic_frames(100_000, stream_id="a")
        while not done.wait(0.05):
            stage.process(media.frame_result(next(frames)))

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        result = CliRunner().invoke(app, ["listen", endpoint, "--count", "2", "--timeout-s", "30"])
    finally:
        done.set()
        publisher.join()
        stage.close()
        context.term()
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["a", "a"]
