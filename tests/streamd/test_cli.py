"""streamd.cli in-process: validate, schema, keys and listen (run is exercised as a real process in test_pipeline_e2e)."""

from __future__ import annotations

import json
import stat
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from streamd.cli import app
from streamd.config import CurveConfig
from streamd.keys import generate, read_key_pair, read_public_key
from streamd.messages import encode, schema
from streamd.stages.publish import curve_server
from tests.streamd import media

runner = CliRunner()


def write(folder: Path, text: str) -> Path:
    path = folder / "streamd.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def good_config(tmp_path: Path, tiny_bundle, clip) -> Path:
    return write(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: onnxruntime
        streams:
          - id: room-1
            source: {clip}
            record: {{dir: rec}}
          - id: room-2
            source: udp://127.0.0.1:5000
        publish: {{bind: "tcp://127.0.0.1:5555"}}
        """,
    )


def test_validate_ok(good_config: Path, tiny_bundle):
    result = runner.invoke(app, ["validate", str(good_config)])
    assert result.exit_code == 0, result.output
    assert f"OK: model tiny-test ({tiny_bundle.sha256[:12]})" in result.stdout
    assert "room-1 (file, record), room-2 (udp)" in result.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: {bundle}\nstreams:\n  - id: a\n    source: nowhere.mp4\n", ":4: streams.0.source: Value error, stream 'a': no such file"),
        ("model: {bundle}\nbatch: {{max_bach: 2}}\nstreams: [{{id: a, source: 'udp://@:5000'}}]\n", ":2: batch.max_bach: unknown field; did you mean 'max_batch'?"),
        ("model: {bundle}\nstreams: [{{id: a, source: 'udp://@:5000'}}\n", ":3: not valid YAML"),
    ],
)
def test_validate_bad_config_exits_2_with_line_and_field_and_no_traceback(tmp_path: Path, tiny_bundle, text, expected):
    path = write(tmp_path, text.format(bundle=tiny_bundle.path))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}{expected}" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("setting", "line", "field", "expected"),
    [
        ("batch: {{max_wait_ms: \"5\"}}", 2, "batch.max_wait_ms", "Input should be a number, not a quoted string"),
        ("batch: {{max_batch: " + "7" * 5000 + "}}", 2, "", "an integer of 5000 characters: no setting takes more"),
        ("x: 1", 2, "x", "unknown field"),
    ],
)
def test_settings_that_can_never_work_are_one_line_each(tmp_path: Path, tiny_bundle, setting, line, field, expected):
    """Exit 2, one line naming file:line and the field, no traceback; nothing created beside the config."""
    path = write(tmp_path, f"model: {tiny_bundle.path}\n{setting.format()}\nstreams: [{{id: a, source: 'udp://@:5000'}}]\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (problem,) = result.stderr.splitlines()
    assert problem.startswith(f"{path}:{line}: {field + ': ' if field else ''}{expected}"), problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamd.yaml"]


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ('""', "an empty folder name would mean the config's own folder"),
        ('"rec\\0x"', "a path cannot hold a NUL byte (got 'rec\\x00x')"),
    ],
)
def test_a_folder_that_names_nothing_is_refused(tmp_path: Path, tiny_bundle, clip, folder: str, expected: str):
    for output in ("record", "detection_log"):
        path = write(tmp_path, f"model: {tiny_bundle.path}\nstreams:\n  - id: a\n    source: {clip}\n"
                               f"    {output}: {{dir: {folder}}}\n")  # fmt: skip
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2, result.output
        (problem,) = result.stderr.splitlines()
        assert problem.startswith(f"{path}:5: streams.0.{output}.dir: Value error, {expected}"), problem


def test_validate_reports_a_broken_bundle(tmp_path: Path):
    (tmp_path / "empty.bundle").mkdir()
    path = write(tmp_path, "model: empty.bundle\nstreams: [{id: a, source: 'udp://@:5000'}]\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1: model: " in result.stderr and "bundle.json: missing" in result.stderr


def test_validate_a_missing_file(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.stderr


def test_schema_prints_the_message_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == schema()


def message(stream: str, seq: int) -> dict:
    return {
        "schema": "streamd.detections/1", "stream": stream, "seq": seq, "pts": seq / 25,
        "captured_at": "2026-11-22T18:00:00.123456Z", "model": {"name": "m", "sha256": "a" * 64},
        "frame": {"width": 160, "height": 120},
        "detections": [{"label": "lesion", "class_id": 0, "score": 0.91, "box": [1, 2, 3, 4]}],
        "latency_ms": {"decode": 1, "queue": 2, "infer": 3, "total": 6.5},
    }  # fmt: skip


class Publisher(threading.Thread):
    """An XPUB that sends `messages` once the listener's subscription has arrived (no slow-joiner race)."""

    def __init__(self, messages: list[dict], extra_topics: tuple[str, ...] = ()):
        super().__init__(daemon=True)
        self.endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
        self.messages, self.extra_topics = messages, extra_topics
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.bind(self.endpoint)

    def run(self) -> None:
        if self.socket.poll(10_000):
            self.socket.recv()  # the subscription
            for topic in self.extra_topics:
                self.socket.send_multipart([topic.encode(), encode(message(topic, 0))])
            for m in self.messages:
                self.socket.send_multipart([m["stream"].encode(), encode(m)])
        self.socket.close()  # LINGER 1000: close waits for the queued messages to go out
        self.context.term()


def test_listen_prints_lines_and_reports_missed_seq_numbers():
    publisher = Publisher([message("room1", s) for s in (0, 1, 4, 5)], extra_topics=("room10",))
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--stream", "room1", "--count", "4", "--timeout-s", "10"])
    publisher.join()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "room1 #0 pts 0.000 s  1 det: lesion 0.91  total 6.5 ms"
    assert [line.split()[1] for line in lines] == ["#0", "#1", "#4", "#5"]  # room10 filtered out despite the prefix
    assert "room1: missed 2 message(s), seq 2..3" in result.stderr
    assert "room1: received 4, missed 2" in result.stderr


def test_listen_json_prints_the_raw_messages():
    sent = [message("a", 0), message("a", 1)]
    publisher = Publisher(sent)
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--json", "--count", "2", "--timeout-s", "10"])
    publisher.join()
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == sent


def test_listen_times_out_with_exit_1_when_nothing_comes():
    endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
    result = runner.invoke(app, ["listen", endpoint, "--timeout-s", "0.2"])
    assert result.exit_code == 1 and "no message" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tcp://127.0.0.1"], "listen: cannot connect to 'tcp://127.0.0.1'"),  # no port
        (["nonsense"], "listen: cannot connect to 'nonsense'"),
        *((["tcp://127.0.0.1:5555", "--timeout-s", value], "Invalid value for '--timeout-s': Input should be less "
           "than or equal to 31622400") for value in ("inf", "nan", "1e20")),  # 1e20 s: past zmq_poll's ms
    ],
)
def test_listen_refuses_bad_arguments_with_exit_2_and_no_traceback(args: list[str], expected: str):
    result = runner.invoke(app, ["listen", *args])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.output


class RawPublisher(Publisher):
    """An XPUB that sends raw multipart messages (good and bad) once the listener has subscribed."""

    def __init__(self, frames: list[list[bytes]]):
        super().__init__([])
        self.frames = frames

    def run(self) -> None:
        if self.socket.poll(10_000):
            self.socket.recv()  # the subscription
            for parts in self.frames:
                self.socket.send_multipart(parts)
        self.socket.close()
        self.context.term()


def test_a_malformed_message_is_counted_and_skipped_not_fatal():
    good = [message("room1", 0), message("room1", 1)]
    bad_seq = {**message("room1", 2), "seq": "two"}
    bad = {
        b"\xff\xfe not json": "not UTF-8 (invalid start byte at byte 0)",
        b"{not json": "not JSON that can be read (Expecting property name",
        b"[" * 100_000 + b"]" * 100_000: "not JSON that can be read (nested too deep)",
        b'{"seq": ' + b"7" * 5000 + b"}": "not JSON that can be read (Exceeds the limit (4300 digits)",
        encode(bad_seq): "seq: 'two' is not of type 'integer'",
    }
    publisher = RawPublisher([
        [b"room1", encode(good[0])],
        *([b"room1", payload] for payload in bad),
        [b"room1", b"{}", b"third frame"],
        [b"room1", encode(good[1])],
    ])  # fmt: skip
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--count", "2", "--timeout-s", "10"])
    publisher.join()
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["#0", "#1"]
    skipped = [line for line in result.stderr.splitlines() if "skipped a malformed message" in line]
    assert len(skipped) == len(bad) + 1  # one line each, and the listener went on to the last good message
    for line, why in zip(skipped, bad.values()):
        assert line.startswith(f"room1: skipped a malformed message: {why}"), line
    assert skipped[-1] == "room1: skipped a malformed message: 3 frames (expected [topic, json])"
    assert f"malformed messages skipped: {len(bad) + 1}" in result.stderr


def test_listen_shows_heartbeats_on_request_and_never_counts_them():
    beat = {
        "schema": "streamd.heartbeat/1", "sent_at": "2026-11-22T18:00:00.123456Z", "uptime_s": 12.0, "state": "running",
        "model": {"name": "m", "sha256": "a" * 64},
        "streams": {"room1": {"state": "running", "frames_in": 300, "processed": 300, "fps": 24.8,
                              "last_result_age_ms": 12.5},
                    "room2": {"state": "reconnecting", "frames_in": 10, "processed": 10, "fps": 0.0,
                              "last_result_age_ms": 8000.0}},
    }  # fmt: skip
    publisher = RawPublisher([[b"_heartbeat", encode(beat)], [b"room1", encode(message("room1", 0))]])
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--stream", "room1", "--heartbeats", "--count", "1",
                                 "--timeout-s", "10"])  # fmt: skip
    publisher.join()
    assert result.exit_code == 0, result.output
    assert "heartbeat: running 12.0 s; room1 running 24.8 fps, room2 reconnecting" in result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["#0"]  # --count 1 counted the detection


# --- CURVE keys: `keys generate` and `listen` with client keys ---------------------------------------


def test_keys_generate_writes_a_pair_with_a_private_secret(tmp_path: Path):
    result = runner.invoke(app, ["keys", "generate", "viewer-1", "--dir", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    public_file, secret_file = tmp_path / "keys" / "viewer-1.key", tmp_path / "keys" / "viewer-1.key_secret"
    assert result.stdout.splitlines()[0].startswith(f"{public_file}: public key")
    assert result.stdout.splitlines()[1].startswith(f"{secret_file}: secret key, mode 0600")
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert read_key_pair(secret_file).public == read_public_key(public_file)


def test_keys_generate_refuses_to_overwrite_with_exit_2(tmp_path: Path):
    assert runner.invoke(app, ["keys", "generate", "a", "--dir", str(tmp_path)]).exit_code == 0
    before = (tmp_path / "a.key_secret").read_bytes()
    result = runner.invoke(app, ["keys", "generate", "a", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "exists: remove it first" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "a.key_secret").read_bytes() == before


class CurvePublisher(Publisher):
    """The Publisher above as a CURVE server with the daemon's own allow-list (streamd.stages.publish.curve_server).

    It waits `wait_s` for a subscription (none comes from a refused subscriber).
    """

    def __init__(self, messages: list[dict], keys: Path, wait_s: float = 10.0):
        super().__init__(messages)
        self.wait_s = wait_s
        self.socket.close(linger=0)  # a fresh socket on a fresh port: CURVE options are set before it binds
        self.endpoint = f"tcp://127.0.0.1:{media.free_port('tcp')}"
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        curve = CurveConfig(server_secret_key_file=keys / "server.key_secret", authorized_clients_dir=keys / "clients")
        self.authenticator = curve_server(self.context, self.socket, curve)
        self.socket.bind(self.endpoint)

    def run(self) -> None:
        if self.socket.poll(int(self.wait_s * 1000)):
            self.socket.recv()  # the subscription: the handshake passed the allow-list
            for m in self.messages:
                self.socket.send_multipart([m["stream"].encode(), encode(m)])
        self.socket.close()
        self.authenticator.stop()  # before term(): its sockets belong to this context
        self.context.term()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """keys/server.*, keys/viewer.*, keys/stranger.*; keys/clients holds viewer.key only."""
    folder = tmp_path / "keys"
    for name in ("server", "viewer", "stranger"):
        generate(name, folder)
    (folder / "clients").mkdir()
    (folder / "clients" / "viewer.key").write_bytes((folder / "viewer.key").read_bytes())
    return folder


def curve_args(keys: Path, client: str = "viewer") -> list[str]:
    return ["--curve-server-key", str(keys / "server.key"), "--curve-client-key", str(keys / f"{client}.key_secret")]


def test_listen_with_an_allowed_key_gets_every_message(keys: Path):
    sent = [message("room1", s) for s in range(3)]
    publisher = CurvePublisher(sent, keys)
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--json", "--count", "3", "--timeout-s", "10",
                                 *curve_args(keys)])  # fmt: skip
    publisher.join()
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == sent


def test_listen_with_a_key_the_daemon_refuses_says_so_and_exits_1_at_once(keys: Path):
    publisher = CurvePublisher([message("room1", 0)], keys, wait_s=3)
    publisher.start()
    started = time.monotonic()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--timeout-s", "20", *curve_args(keys, "stranger")])
    assert time.monotonic() - started < 10  # not the 20 s timeout: a refusal is final
    assert result.exit_code == 1, result.output
    assert "refused this subscriber's key" in result.stderr and "authorized_clients_dir" in result.stderr
    publisher.join()


def test_listen_without_keys_on_a_curve_daemon_hints_at_curve(keys: Path):
    publisher = CurvePublisher([message("room1", 0)], keys, wait_s=2)
    publisher.start()
    result = runner.invoke(app, ["listen", publisher.endpoint, "--timeout-s", "1"])
    assert result.exit_code == 1
    assert "the daemon may publish with curve; give --curve-server-key" in result.stderr
    assert result.stderr.count("handshake failed") == 1  # said once, though ZeroMQ retries
    publisher.join()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--curve-server-key", "{keys}/server.key"], "--curve-server-key and --curve-client-key go together"),
        (["--curve-client-key", "{keys}/viewer.key_secret"], "--curve-server-key and --curve-client-key go together"),
        (["--curve-server-key", "{keys}/nope.key", "--curve-client-key", "{keys}/viewer.key_secret"], "cannot read the key file {keys}/nope.key"),
        (["--curve-server-key", "{keys}/server.key_secret", "--curve-client-key", "{keys}/viewer.key_secret"], "holds a secret key"),
        (["--curve-server-key", "{keys}/server.key", "--curve-client-key", "{keys}/viewer.key"], "has no secret key"),
        (["--curve-server-key", "{keys}/server.key", "--curve-client-key", "{keys}/open.key_secret"], "open to other users (mode 0644)"),
        (["--curve-server-key", "{keys}/clients", "--curve-client-key", "{keys}/viewer.key_secret"], "is not a key file"),
    ],
)  # fmt: skip
def test_listen_refuses_bad_key_files_with_exit_2_and_no_traceback(keys: Path, args: list[str], expected: str):
    (keys / "open.key_secret").write_bytes((keys / "viewer.key_secret").read_bytes())
    (keys / "open.key_secret").chmod(0o644)
    result = runner.invoke(app, ["listen", "tcp://127.0.0.1:5555", *[a.format(keys=keys) for a in args]])
    assert result.exit_code == 2, result.output
    assert expected.format(keys=keys) in result.stderr and "Traceback" not in result.output
