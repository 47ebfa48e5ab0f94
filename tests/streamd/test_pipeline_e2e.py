"""`streamd run` as a real process: two streams, a real subscriber process, SIGTERM mid-stream, bad configs.

Everything listens on 127.0.0.1. Each test stops only the processes it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from streamd.messages import schema
from tests.streamd import media

pytestmark = pytest.mark.slow

STREAMD = Path(sys.executable).with_name("streamd")


def streamd(*args: str, env: dict | None = None) -> subprocess.Popen:
    command = [str(STREAMD)] if STREAMD.exists() else [sys.executable, "-m", "streamd.cli"]
    return subprocess.Popen(
        [*command, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def listen(endpoint: str) -> subprocess.Popen:
    """`streamd listen --json` in its own process with a real SUB socket, connected before this returns;
    it exits after 8 s without a message, once the daemon is done."""
    listener = streamd("listen", endpoint, "--json", "--timeout-s", "8")  # the daemon's start (self-test) included
    assert listener.stderr.readline().startswith("listening on")
    return listener


class NotifyReader(threading.Thread):
    """systemd's side of $NOTIFY_SOCKET: reads every datagram as it comes."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> list[str]:
        self.done.set()
        self.join()
        self.sock.close()
        return self.messages


def jsonl(paths: list[Path]) -> list[dict]:
    """The frames' messages of detection logs, each checked against its own schema (track events are checked and left
    out: they have no seq)."""
    return frames_of([json.loads(line) for path in sorted(paths) for line in path.read_text().splitlines()])


def frames_of(messages: list[dict]) -> list[dict]:
    """The frames' messages (streamd.detections/3), every message valid against the schema it names."""
    for m in messages:
        jsonschema.validate(m, schema(m["schema"]))
    return [m for m in messages if m["schema"] == schema()["$id"]]


def test_two_streams_to_a_subscriber_process_a_recording_and_a_log(tmp_path: Path, tiny_bundle, clip):
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        batch: {{max_batch: 4, max_wait_ms: 5}}
        streams:
          - id: fast                      # as fast as it decodes
            source: {clip}
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
          - id: camera-like               # paced at 25 fps, and (block) never dropping a frame
            source: {clip}
            realtime: true
            queue: {{policy: block}}
            detection_log: {{dir: log}}
        publish: {{bind: "{endpoint}", sndhwm: 1000, linger_ms: 500}}
        """,
    )
    # a separate process with a real SUB socket; it exits after 3 s without a message once the daemon is done
    listener = listen(endpoint)
    try:
        daemon = streamd("run", str(config))
        out, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
        received, listen_err = listener.communicate(timeout=30)
    finally:
        media.stop(listener)
    assert listener.returncode == 0, listen_err
    # the summary table names both streams with all 40 frames processed
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(rows) == {"fast", "camera-like"}
    assert all(row.split("│")[3].strip() == "40" for row in rows.values())
    # every message is valid; per stream the seq numbers have no gap (the first ones may precede the subscription)
    messages = frames_of([json.loads(line) for line in received.splitlines()])
    by_stream = {sid: [m["seq"] for m in messages if m["stream"] == sid] for sid in ("fast", "camera-like")}
    for sid, seqs in by_stream.items():
        if seqs:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), sid
    assert len(by_stream["camera-like"]) >= 30 and by_stream["camera-like"][-1] == 39
    assert {m["model"]["sha256"] for m in messages} == {tiny_bundle.sha256}
    assert "missed" not in listen_err.replace("missed 0", "")
    # the detection logs are complete and the recording plays with every frame
    logs = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    for sid in ("fast", "camera-like"):
        assert [m["seq"] for m in logs if m["stream"] == sid] == list(range(40))
    (recording,) = (tmp_path / "rec").glob("fast_*.mp4")
    assert media.probe_frame_count(recording) == 40


def test_sigterm_mid_stream_drains_closes_and_exits_0(tmp_path: Path, tiny_bundle, long_clip):
    notify = NotifyReader(tmp_path / "notify")
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: eus-1
            source: {long_clip}
            realtime: true
            queue: {{policy: block}}       # paced, yet no frame dropped: what is decoded before the stop is logged
            segment_s: 2
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
        """,
    )
    daemon = streamd("run", str(config), env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(jsonl(list((tmp_path / "log").glob("*.jsonl")))) < 60:
            time.sleep(0.1)  # well into the second segment
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    finally:
        media.stop(daemon)
    assert daemon.returncode == 0, err
    assert "SIGTERM: stopping" in err and "Traceback" not in err
    lines = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    assert 60 <= len(lines) < 150  # stopped mid-stream
    assert [m["seq"] for m in lines] == list(range(len(lines)))  # nothing lost while draining
    recordings = sorted((tmp_path / "rec").glob("eus-1_*.mp4"))
    assert len(recordings) >= 2
    assert sum(media.probe_frame_count(r) for r in recordings) == len(lines)  # every segment closed and playable
    kinds = [message.split("\n")[0].split("=")[0] for message in notify.close()]
    assert kinds[0] == "STATUS" and "READY" in kinds  # "loading the model", then READY after warm-up
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")


@pytest.mark.parametrize(
    "text, code, expected",
    [
        ("model: {bundle}\nstreams:\n  - id: a\n    source: {clip}\n    queue: {{size: 0}}\n", 2,
         ":5: streams.0.queue.size: Input should be greater than or equal to 1"),
        ("model: {bundle}\nstreams:\n  - id: a\n    source: {clip}\n    recrod: {{dir: x}}\n", 2,
         ":5: streams.0.recrod: unknown field; did you mean 'record'?"),
        ("model: {broken}\nstreams:\n  - id: a\n    source: {clip}\n", 2, ":1: model: "),  # as validate says it
    ],
)  # fmt: skip
def test_bad_configs_exit_with_one_message_and_no_traceback(tmp_path: Path, tiny_bundle, clip, text, code, expected):
    (tmp_path / "broken.bundle").mkdir()
    config = media.write_config(tmp_path, text.format(bundle=tiny_bundle.path, clip=clip, broken=tmp_path / "broken.bundle"))
    daemon = streamd("run", str(config))
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == code
    assert "Traceback" not in err
    assert f"{config}{expected}" in err
    if "model" in expected:
        assert "bundle.json: missing" in err


def test_a_live_udp_stream_for_a_fixed_duration(tmp_path: Path, tiny_bundle):
    port = media.free_port("udp")
    sender = media.udp_sender(port, size=(160, 120), fps=25)
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: live
            source: "udp://127.0.0.1:{port}"
            timeout_s: 3
            queue: {{size: 2}}
            detection_log: {{dir: log}}
        """,
    )
    try:
        daemon = streamd("run", str(config), "--duration-s", "3")
        out, err = daemon.communicate(timeout=60)
    finally:
        media.stop(sender)
    assert daemon.returncode == 0, err
    assert "[live]" in err and "connected" in err and "stopped by duration" in out
    lines = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    assert len(lines) >= 25  # about 2 s of 25 fps after the decoder found a keyframe
    seqs = [m["seq"] for m in lines]
    assert seqs == sorted(seqs)  # live: drops allowed (and counted), order never broken


def test_a_corrupt_file_ends_its_own_stream_and_the_others_run_complete(tmp_path: Path, tiny_bundle, clip):
    """Streams fail alone: the corrupt file's stream ends with its error; the live UDP stream and the healthy
    file beside it keep every frame, message and recording; the exit code says a stream failed."""
    corrupt = media.corrupt_ts(tmp_path)
    port = media.free_port("udp")
    sender = media.udp_sender(port, size=(160, 120), fps=25)
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: corrupt
            source: {corrupt}
            detection_log: {{dir: log}}
          - id: good
            source: {clip}
            realtime: true
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
          - id: live
            source: "udp://127.0.0.1:{port}"
            queue: {{size: 4}}
            detection_log: {{dir: log}}
        publish: {{bind: "{endpoint}", linger_ms: 500}}
        """,
    )
    listener = streamd("listen", endpoint, "--json", "--timeout-s", "8")  # the daemon's start (self-test) included
    try:
        assert listener.stderr.readline().startswith("listening on")
        daemon = streamd("run", str(config), "--duration-s", "5")
        out, err = daemon.communicate(timeout=90)
        received, _ = listener.communicate(timeout=30)
    finally:
        media.stop(sender)
        media.stop(listener)
    assert daemon.returncode == 1, err  # a stream failed: not a clean run
    assert "Traceback" not in err and "IndexError" in err
    (last,) = [line for line in err.splitlines() if line.startswith("streamd: ")]
    assert "corrupt: source corrupt: IndexError" in last and "the others ran on" in last
    assert "stopped by duration" in out  # the daemon ran on after the corrupt stream ended
    logs = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    assert [m["seq"] for m in logs if m["stream"] == "good"] == list(range(40))
    (recording,) = (tmp_path / "rec").glob("good_*.mp4")
    assert media.probe_frame_count(recording) == 40
    live = [m["seq"] for m in logs if m["stream"] == "live"]
    assert len(live) >= 50 and live == sorted(live)  # ~3 s of the live feed after it connected
    published = frames_of([json.loads(line) for line in received.splitlines()])
    assert {m["stream"] for m in published} >= {"good", "live"}
    good = [m["seq"] for m in published if m["stream"] == "good"]
    assert good == list(range(good[0], 40))  # every message after the subscription, none missing


def test_a_full_recording_disk_stops_only_that_recording(tmp_path: Path, tiny_bundle, long_clip, small_disk: Path):
    """Stream a records to a disk that fills up: its recording stops (and says so), while its detection log,
    its messages and stream b (recording included) stay complete; the daemon runs to the end and exits 0."""
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: a
            source: {long_clip}
            record: {{dir: {small_disk}, preset: ultrafast, crf: 0}}
            detection_log: {{dir: log}}
          - id: b
            source: {long_clip}
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
        """,
    )
    daemon = streamd("run", str(config))
    out, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, err
    assert "Traceback" not in err
    assert "stream 'a': cannot write" in err and "No space left" in err and "retrying in" in err
    logs = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    for sid in ("a", "b"):
        assert [m["seq"] for m in logs if m["stream"] == sid] == list(range(150))  # detection went on
    (recording,) = (tmp_path / "rec").glob("b_*.mp4")
    assert media.probe_frame_count(recording) == 150
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "record failed" in rows["a"] and rows["b"].split("│")[-2].strip() == "0"  # a: drops counted; b: no error


def test_the_heartbeat_tells_running_from_reconnecting_and_not_running(tmp_path: Path, tiny_bundle, clip):
    """A real subscriber reads _heartbeat once a second: a live stream running, then reconnecting once its sender
    stops; a file stream ended; and nothing once the daemon has exited."""
    import zmq

    port = media.free_port("udp")
    sender = media.udp_sender(port, size=(160, 120), fps=25)
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: live
            source: "udp://127.0.0.1:{port}"
            timeout_s: 1
          - id: file
            source: {clip}
        publish: {{bind: "{endpoint}"}}
        """,
    )
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"_heartbeat")
    sub.connect(endpoint)
    daemon = streamd("run", str(config), "--duration-s", "12")
    states: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.poll() is None:
            if not sub.poll(200):
                continue
            topic, payload = sub.recv_multipart()
            beat = json.loads(payload)
            jsonschema.validate(beat, schema("streamd.heartbeat/2"))
            states.append({sid: s["state"] for sid, s in beat["streams"].items()})
            if states[-1]["live"] == "running" and sender.poll() is None:
                media.stop(sender)  # the camera goes away while the daemon keeps running
        out, err = daemon.communicate(timeout=30)
        assert not sub.poll(2500)  # the daemon is gone: no heartbeat any more
    finally:
        media.stop(sender)
        media.stop(daemon)
        sub.close(linger=0)
        context.term()
    assert daemon.returncode == 0, err
    live = [s["live"] for s in states]
    assert "running" in live and "reconnecting" in live[live.index("running"):]
    assert states[-1]["file"] == "ended"
