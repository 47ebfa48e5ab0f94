"""streamd.ops.prometheus: /metrics scraped during real runs, /healthz turning 503 with a stalled worker.

The runs are run_pipeline's, with the tiny bundle and real media (decode,
record, publish); the stalled worker is a backend that hangs until the test
has seen /healthz fail, as in test_runner's test_a_stalled_worker_starves_the_watchdog.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from streamd.config import MetricsConfig, load_config
from streamd.errors import ConfigError, OutputError
from streamd.detector import Detector
from streamd.ops.metrics import LATENCY_BUCKETS_MS, Metrics, dropped
from streamd.ops import prometheus
from streamd.ops.prometheus import MetricsServer, RunCollector
from streamd.pipeline import supervisor as supervisor_module
from streamd.pipeline.daemon import run_pipeline
from streamd.pipeline.queues import BoundedQueue
from streamd.types import Frame, Latency
from tests.streamd import media
from tests.streamd.pipeline.fakes import FakeBackend


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""  # not serving (yet)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }  # fmt: skip


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Run(threading.Thread):
    """run_pipeline in a thread until `stop` is set; `summary` or `error` afterwards."""

    def __init__(self, config, **kwargs):
        super().__init__(daemon=True)
        self.config, self.kwargs = config, kwargs
        self.stop = threading.Event()
        self.summary = self.error = None
        self.start()

    def run(self) -> None:
        try:
            self.summary = run_pipeline(self.config, self.stop, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def finish(self):
        self.stop.set()
        self.join(30)
        assert not self.is_alive() and self.error is None, self.error
        return self.summary


def config_file(folder: Path, text: str):
    return load_config(media.write_config(folder, text))


@pytest.mark.parametrize(
    "bind, error",
    [
        ("127.0.0.1:9108", None),
        ("127.3.2.1:1", None),
        ("localhost:65535", None),
        ("[::1]:9108", None),
        ("0.0.0.0:9108", "not a loopback address"),
        ("10.0.0.5:9108", "not a loopback address"),
        ("[::]:9108", "not a loopback address"),
        ("metrics.example.org:9108", "not a loopback address"),
        ("[::ffff:127.0.0.1]:9108", None),
        ("::1:9108", "in brackets"),
        ("127.0.0.1:0", "1..65535"),
        ("127.0.0.1:99999", "1..65535"),
        ("127.0.0.1", "expected HOST:PORT"),
    ],
)
def test_bind_is_loopback_host_and_port(bind, error):
    if error is None:
        assert MetricsConfig(bind=bind).bind == bind
    else:
        with pytest.raises(ValidationError, match=error):
            MetricsConfig(bind=bind)


def test_a_remote_bind_is_refused_with_its_file_and_line(tmp_path: Path, tiny_bundle, clip):
    text = f"model: {tiny_bundle.path}\nstreams: [{{id: a, source: {clip}}}]\nmetrics:\n  bind: 0.0.0.0:9108\n"
    with pytest.raises(ConfigError, match=r"streamd.yaml:4: metrics.bind: .*0.0.0.0:9108: not a loopback address"):
        config_file(tmp_path, text)


def test_off_unless_configured(tmp_path: Path, tiny_bundle, clip):
    config = config_file(tmp_path, f"model: {tiny_bundle.path}\nstreams: [{{id: a, source: {clip}}}]\n")
    assert config.metrics is None
    config = config_file(tmp_path, f"model: {tiny_bundle.path}\nstreams: [{{id: a, source: {clip}}}]\nmetrics: {{}}\n")
    assert config.metrics.bind == "127.0.0.1:9108"


def test_a_scrape_during_a_run_reads_the_pipelines_metrics(tmp_path: Path, tiny_bundle, clip):
    port = media.free_port("tcp")
    config = config_file(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: a
            source: {clip}
            loop: true
            realtime: true
            max_age_ms: null          # never stale, even when this machine is too busy to publish in time
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
        publish: {{bind: "tcp://127.0.0.1:{media.free_port('tcp')}"}}
        metrics: {{bind: "127.0.0.1:{port}"}}
        """,
    )
    run = Run(config)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{url}/healthz")[1].startswith("ok\n"), what="/healthz ok")
        assert get(f"{url}/healthz") == (200, "ok\na: running\n")  # the body names each stream's state
        a = (("stream", "a"),)

        def recorded() -> dict | None:  # a scrape once 30 frames are through and the recording has bytes
            status, text = get(f"{url}/metrics")
            values = samples(text) if status == 200 else {}
            ready = values.get(("streamd_processed_total", a), 0) >= 30
            return values if ready and values.get(("streamd_recording_bytes", a), 0) > 0 else None

        values = wait_for(recorded, what="30 frames and a recording")
    finally:
        summary = run.finish()
    assert get(f"{url}/metrics")[0] == 0  # stopped with the run
    processed = values[("streamd_processed_total", a)]
    assert processed <= values[("streamd_frames_in_total", a)] <= summary.stream("a").frames_in
    assert values[("streamd_opens_total", a)] == 1 and values[("streamd_published_total", a)] > 0
    assert values[("streamd_errors_total", a)] == 0 and values[("streamd_reconnects_total", a)] == 0
    assert 5 < values[("streamd_fps", a)] < 100  # a realtime 25 fps file
    for stage in ("decode", "queue", "infer", "total"):
        labels = (("stage", stage), ("stream", "a"))
        count = values[("streamd_latency_seconds_count", labels)]
        assert count == processed  # the histograms and the counters are read in one go
        inf = (("le", "+Inf"), *labels)
        assert values[("streamd_latency_seconds_bucket", tuple(sorted(inf)))] == count
        assert values[("streamd_latency_seconds_sum", labels)] > 0
    queues = {dict(labels)["queue"]: n for (name, labels), n in values.items() if name == "streamd_queue_capacity"}
    # every queue of the graph; a paced stream's input holds its newest frame (what waits for inference stays fresh);
    # the publisher's has room for the streams' queues and a whole batch
    assert queues == {"input:a": 1, "in_flight": 1, "output:a": 8, "publish": 16}
    (segment,) = (tmp_path / "rec").glob("a_*.mp4")
    assert 0 < values[("streamd_recording_bytes", a)] <= segment.stat().st_size
    assert values[("process_resident_memory_bytes", ())] > 0


def test_drops_by_reason_queue_depths_and_cumulative_histograms():
    metrics = Metrics(["a", "b"])
    for reason, n in (("input", 3), ("record failed", 2)):
        metrics.count("a", dropped(reason), n)
    for total_ms in (0.5, 3.0, 3.0, 40.0, 20_000.0):
        metrics.result("a", detections=1, latency=Latency(1.0, 1.0, 1.0, total_ms))
    q = BoundedQueue("output:a", 4, "drop_oldest")
    for seq in range(2):
        q.put(Frame("a", seq, seq / 25, np.zeros((4, 4, 3), np.uint8), decoded_at=0.0), timeout_s=0.1)
    recording = Path(__file__)  # any file: its size is what is exported
    recorder = type("Recorder", (), {"stream_id": "a", "segments": [recording, recording.with_name("gone.mp4")]})()
    server = MetricsServer("127.0.0.1:0", RunCollector(metrics, [q], [recorder]), lambda: [])
    server.start()
    try:
        status, text = get(f"http://127.0.0.1:{server.port}/metrics")
        assert get(f"http://127.0.0.1:{server.port}/nothing")[0] == 404
    finally:
        server.close()
    assert status == 200
    values = samples(text)
    assert values[("streamd_frames_dropped_total", (("reason", "input"), ("stream", "a")))] == 3
    assert values[("streamd_frames_dropped_total", (("reason", "record failed"), ("stream", "a")))] == 2
    assert ("streamd_frames_dropped_total", (("reason", "input"), ("stream", "b"))) not in values
    assert values[("streamd_processed_total", (("stream", "b"),))] == 0  # every counter, from the start
    assert values[("streamd_queue_depth", (("policy", "drop_oldest"), ("queue", "output:a")))] == 2
    assert values[("streamd_recording_bytes", (("stream", "a"),))] == recording.stat().st_size
    buckets = {
        dict(labels)["le"]: value for (name, labels), value in values.items()
        if name == "streamd_latency_seconds_bucket" and ("stage", "total") in labels and ("stream", "a") in labels
    }  # fmt: skip
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1
    assert (buckets["0.001"], buckets["0.005"], buckets["0.05"], buckets["10.0"], buckets["+Inf"]) == (1, 3, 4, 4, 5)
    assert values[("streamd_latency_seconds_sum", (("stage", "total"), ("stream", "a")))] == pytest.approx(20.0465)


def test_a_taken_port_fails_at_start(tmp_path: Path):
    first = MetricsServer("127.0.0.1:0", RunCollector(Metrics(["a"]), [], []), lambda: [])
    first.start()
    try:
        second = MetricsServer(f"127.0.0.1:{first.port}", RunCollector(Metrics(["a"]), [], []), lambda: [])
        with pytest.raises(OutputError, match="metrics: cannot serve on 127.0.0.1:"):
            second.start()
    finally:
        first.close()


def test_healthz_says_stale_when_a_live_stream_delivers_nothing(tmp_path: Path, tiny_bundle, clip):
    """Overload that publishes nothing is not "ok": a paced stream whose every result is older than its budget (here 1
    ms, which no result meets) is stale, 503 with its name, while a file stream beside it stays running."""
    port = media.free_port("tcp")
    config = config_file(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - {{id: live, source: {clip}, loop: true, realtime: true, max_age_ms: 1}}
          - {{id: file, source: {clip}, loop: true}}
        publish: {{bind: "tcp://127.0.0.1:{media.free_port('tcp')}"}}
        metrics: {{bind: "127.0.0.1:{port}"}}
        """,
    )
    run = Run(config)
    try:
        status, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/healthz"))[1].startswith("stale") and r,
                                what="stale")  # fmt: skip
    finally:
        summary = run.finish()
    assert (status, body) == (503, "stale: live\nlive: stale\nfile: running\n")
    assert dict(summary.stream("live").dropped_by_queue).get("stale", 0) > 0 and summary.stream("live").published == 0


def test_healthz_fails_while_a_worker_is_stalled(tmp_path: Path, tiny_bundle, clip, monkeypatch):
    """starting (503) during warm-up, ok (200) while running, stalled (503, naming the worker) while the backend
    hangs past the stall limit, and ok again once it returns: what the supervisor tells the watchdog."""
    monkeypatch.setattr(supervisor_module, "STALL_S", 0.3)
    port = media.free_port("tcp")
    url = f"http://127.0.0.1:{port}/healthz"
    config = config_file(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        batch: {{max_batch: 1}}
        streams: [{{id: a, source: {clip}, loop: true}}]
        metrics: {{bind: "127.0.0.1:{port}"}}
        """,
    )
    backend = FakeBackend(max_batch=1)
    hang, release = threading.Event(), threading.Event()

    def hook(call: int) -> None:
        if call == 1 or hang.is_set():  # the first warm-up run, then whenever the test says
            release.wait(30)
            release.clear()

    backend.hook = hook
    run = Run(config, detector=Detector.for_bundle(tiny_bundle, backend))
    try:
        assert wait_for(lambda: (r := get(url))[0] and r, what="an answer") == (503, "starting\na: starting\n")
        release.set()
        wait_for(lambda: get(url) == (200, "ok\na: running\n"), what="ok")
        hang.set()
        # (a file read as fast as it decodes has no stale budget: its state stays running while the backend hangs)
        assert wait_for(lambda: (r := get(url))[0] == 503 and r, what="503") == (503, "stalled: batch\na: running\n")
        hang.clear()
        release.set()
        wait_for(lambda: get(url) == (200, "ok\na: running\n"), what="ok again")
    finally:
        hang.clear()
        release.set()
        summary = run.finish()
    assert summary.ok and summary.stream("a").processed > 0


def test_hundreds_of_idle_connections_neither_starve_healthz_nor_make_threads():
    """200 connections that never send a byte (500 made 500 threads and a 1 s /healthz): /healthz still answers,
    and the server runs no more threads than its accept thread and its workers."""
    server = MetricsServer("127.0.0.1:0", RunCollector(Metrics(["a"]), [], []), lambda: [])
    threads_before = threading.active_count()
    server.start()
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
        assert threading.active_count() <= threads_before + 1 + prometheus.MAX_WORKERS
    finally:
        for connection in idle:
            connection.close()
        server.close()


def test_a_client_that_never_finishes_its_request_is_dropped_and_the_next_one_answered():
    server = MetricsServer("127.0.0.1:0", RunCollector(Metrics(["a"]), [], []), lambda: [])
    server.start()
    slow = []
    try:
        for _ in range(prometheus.MAX_WORKERS * 2):  # every worker holds one half-sent request until REQUEST_S
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            connection.sendall(b"GET /metr")
            slow.append(connection)
        assert wait_for(lambda: get(f"http://127.0.0.1:{server.port}/healthz")[0], what="an answer") == 200
        for connection in slow:
            assert connection.recv(100) == b""  # closed by the server, no answer
    finally:
        for connection in slow:
            connection.close()
        server.close()


def test_a_daemon_stopped_after_a_scrape_starts_again_at_once(tmp_path: Path, tiny_bundle, clip):
    """A closed scrape leaves the port in TIME-WAIT: a restart at once must not fail ("Address already in use")."""
    port = media.free_port("tcp")
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: onnxruntime
        streams: [{{id: a, source: {clip}, loop: true, realtime: true}}]
        metrics: {{bind: "127.0.0.1:{port}"}}
        """,
    )
    streamd = Path(sys.executable).with_name("streamd")
    for start in ("first", "second"):
        daemon = subprocess.Popen([streamd, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: daemon.poll() is not None or get(f"http://127.0.0.1:{port}/healthz")[1].startswith("ok\n"),
                     timeout_s=120, what=f"the {start} start's /healthz")  # fmt: skip
            daemon.send_signal(signal.SIGTERM)
            stdout, stderr = daemon.communicate(timeout=60)
        finally:
            media.stop(daemon)
        assert daemon.returncode == 0, f"{start} start: {stderr}"
        assert "Address already in use" not in stderr
