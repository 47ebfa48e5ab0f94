"""docs/message-schema.md's Python subscriber, run as written against a real daemon: it must live through
heartbeats and print the detections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.streamd import media
from tests.streamd.test_pipeline_e2e import streamd

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "message-schema.md"


def python_example() -> str:
    """The code block under "### In Python (pyzmq)"."""
    section = DOC.read_text().split("### In Python (pyzmq)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_survives_heartbeats_against_a_real_daemon(tmp_path: Path, tiny_bundle, long_clip):
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    code = python_example()
    assert 'sub.connect("tcp://127.0.0.1:5555")' in code
    subscriber = subprocess.Popen(
        [sys.executable, "-u", "-c", code.replace("tcp://127.0.0.1:5555", endpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: cam
            source: {long_clip}
            realtime: true
        publish: {{bind: "{endpoint}", linger_ms: 500}}
        """,
    )
    try:
        daemon = streamd("run", str(config), "--duration-s", "4")
        _, daemon_err = daemon.communicate(timeout=90)
        alive = subscriber.poll() is None  # still running: it survived every message
        subscriber.terminate()
        out, err = subscriber.communicate(timeout=10)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(timeout=10)
    assert daemon.returncode == 0, daemon_err
    assert alive, err
    assert "Traceback" not in err, err
    lines = out.splitlines()
    assert any(line.startswith("daemon running {'cam': ") for line in lines), out
    seqs = [int(line.split()[1]) for line in lines if line.startswith("cam ")]
    assert len(seqs) >= 20 and seqs == sorted(seqs), out
