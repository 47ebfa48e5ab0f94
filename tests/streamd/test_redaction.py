"""streamd.redact: a camera's user and password, given in its URL, are printed nowhere.

The end-to-end test runs `streamd run` with an RTSP source that refuses the
connection (port 9 on 127.0.0.1), beside a file stream that keeps the daemon
busy, and looks for the password in everything the daemon prints or serves:
stderr (the log), stdout (the summary), /metrics and the heartbeat.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import zmq

from streamd.ops.logging import setup_logging
from streamd.redact import redact
from tests.streamd import media

SECRET = "hunter2pw"
URL = f"rtsp://admin:{SECRET}@127.0.0.1:9/x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (URL, "rtsp://***@127.0.0.1:9/x"),
        (f"lost: stream 'down' ({URL})", "lost: stream 'down' (rtsp://***@127.0.0.1:9/x)"),
        ("rtsps://u:p@ss:w@cam.local/live?x=1", "rtsps://***@cam.local/live?x=1"),  # an unescaped @ in the password
        ("srt://user@10.0.0.5:9000", "srt://***@10.0.0.5:9000"),
        ("two: udp://a:b@h:1 and RTSP://c:d@h2/p", "two: udp://***@h:1 and RTSP://***@h2/p"),
        ("rtsp://cam.local/live mail me@example.org", "rtsp://cam.local/live mail me@example.org"),  # no userinfo
        ("/videos/a@b.mp4", "/videos/a@b.mp4"),
        ("udp://@:5000", "udp://@:5000"),  # no user: FFmpeg's listen-on-any-address form
    ],
)
def test_redact(text: str, expected: str):
    assert redact(text) == expected


def test_the_log_handler_redacts_messages_arguments_and_tracebacks():
    out = io.StringIO()
    setup_logging("INFO", stream=out)
    log = logging.getLogger("streamd.test")
    try:
        log.warning("lost: stream %r (%s)", "down", URL)
        try:
            raise ConnectionError(f"cannot open {URL}")
        except ConnectionError:
            log.exception("open failed")
    finally:
        setup_logging("INFO")
    text = out.getvalue()
    assert SECRET not in text and "admin" not in text
    assert "lost: stream 'down' (rtsp://***@127.0.0.1:9/x)" in text
    assert "ConnectionError: cannot open rtsp://***@127.0.0.1:9/x" in text


def test_streamd_run_prints_and_serves_no_password(tmp_path: Path, tiny_bundle, clip):
    metrics_port, publish_port = media.free_port("tcp"), media.free_port("tcp")
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: onnxruntime
        streams:
          - {{id: down, source: "{URL}", timeout_s: 1, reconnect: {{initial_s: 0.2}}}}
          - {{id: busy, source: {clip}, loop: true, realtime: true}}
        publish: {{bind: "tcp://127.0.0.1:{publish_port}"}}
        metrics: {{bind: "127.0.0.1:{metrics_port}"}}
        """,
    )
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{publish_port}")
    daemon = subprocess.Popen([Path(sys.executable).with_name("streamd"), "run", str(config), "--duration-s", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    served, heartbeats = "", []
    try:
        while len(heartbeats) < 3 and sub.poll(120_000):
            topic, payload = sub.recv_multipart()
            if topic == b"_heartbeat":
                heartbeats.append(payload.decode())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
            served = response.read().decode()
        stdout, stderr = daemon.communicate(timeout=120)
    finally:
        sub.close()
        context.term()
        media.stop(daemon)
    assert len(heartbeats) == 3 and 'streamd_frames_in_total{stream="down"}' in served
    assert "rtsp://***@127.0.0.1:9/x" in stderr  # the lost source is logged, without its credentials
    for text in (stderr, stdout, served, *heartbeats):
        assert SECRET not in text and "admin:" not in text
