"""Prometheus /metrics and /healthz for one run, over HTTP on a loopback address (config `metrics.bind`).

Nothing here counts: `RunCollector` reads the pipeline's one `Metrics`
(`Metrics.counts()`), the graph's queues and the recorders' files when
Prometheus scrapes, so /metrics and the end-of-run table can never disagree.
Exported (all per stream unless said otherwise):

- `streamd_<counter>_total{stream}` for every counter of
  `streamd.ops.metrics.COUNTERS` (frames_in, processed, reconnects,
  errors, ...) and those a part declared (published, track_events, ...), and
  `streamd_frames_dropped_total{stream, reason}` per drop reason;
- `streamd_fps{stream}`: frames through inference per second since the first
  frame (for the current rate: `rate(streamd_processed_total[1m])`);
- `streamd_latency_seconds{stream, stage}`: histograms of the decode, queue,
  infer and total latencies (every frame since start);
- `streamd_queue_depth{queue, policy}` and `streamd_queue_capacity{queue, policy}`;
- `streamd_recording_bytes{stream}`: bytes on disk of the segments this run recorded;
- the process's own `process_*` metrics (resident memory, CPU, open files).

`/healthz` answers 200 `ok` while the supervisor feeds the systemd watchdog,
and 503 with the reason when it would not (a worker or the supervisor silent
for over `supervisor.STALL_S`), or before the pipeline runs (`starting`).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from streamd.config import split_host_port
from streamd.errors import OutputError
from streamd.ops.metrics import LATENCY_BUCKETS_MS, Metrics, drop_reason
from streamd.pipeline.queues import BoundedQueue
from streamd.selftest import SelfTestResult

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """What /metrics reads of a recorder (streamd.stages.record.RecordStage): its stream and its segment files."""

    stream_id: str
    segments: list[Path]


class RunCollector:
    """A prometheus_client collector that reads one run's Metrics, queues and recordings on every scrape."""

    def __init__(
        self, metrics: Metrics, queues: Sequence[BoundedQueue], recorders: Sequence[Recorder],
        selftest: SelfTestResult | None = None,
    ):  # fmt: skip
        self.metrics = metrics
        self.queues = tuple(queues)
        self.recorders = tuple(recorders)
        self.selftest = selftest  # the self-test before READY=1 (streamd.selftest); None: a caller's own detector

    def collect(self) -> Iterator[Metric]:
        streams = self.metrics.counts()
        counters: dict[str, CounterMetricFamily] = {}
        dropped = CounterMetricFamily(
            "streamd_frames_dropped", "Frames dropped, by reason (streamd architecture: drop reasons).",
            labels=["stream", "reason"],
        )  # fmt: skip
        fps = GaugeMetricFamily("streamd_fps", "Frames through inference per second since the stream's first frame.",
                                labels=["stream"])  # fmt: skip
        latency = HistogramMetricFamily(
            "streamd_latency_seconds", "Per-frame latency of a stage: decode, queue, infer, and total "
            "(packet out of the demuxer to detections ready).", labels=["stream", "stage"],
        )  # fmt: skip
        for s in streams:
            for name, value in s.counts:
                if (reason := drop_reason(name)) is not None:
                    dropped.add_metric([s.stream_id, reason], value)
                    continue
                if name not in counters:
                    counters[name] = CounterMetricFamily(f"streamd_{name}", self.metrics.describe(name), labels=["stream"])
                counters[name].add_metric([s.stream_id], value)
            fps.add_metric([s.stream_id], s.fps)
            for stage, buckets, sum_ms in s.latency_buckets:
                cumulative, total = [], 0
                for bound_ms, count in zip((*LATENCY_BUCKETS_MS, float("inf")), buckets):
                    total += count
                    cumulative.append(("+Inf" if bound_ms == float("inf") else repr(bound_ms / 1e3), total))
                latency.add_metric([s.stream_id, stage], cumulative, sum_ms / 1e3)
        yield from counters.values()
        yield from (dropped, fps, latency)
        depth = GaugeMetricFamily("streamd_queue_depth", "Items in a bounded queue now.", labels=["queue", "policy"])
        capacity = GaugeMetricFamily("streamd_queue_capacity", "Size of a bounded queue.", labels=["queue", "policy"])
        for q in self.queues:
            depth.add_metric([q.name, q.policy], len(q))
            capacity.add_metric([q.name, q.policy], q.maxsize)
        yield from (depth, capacity)
        recorded = GaugeMetricFamily("streamd_recording_bytes", "Bytes on disk of the recording segments this run "
                                     "wrote for the stream.", labels=["stream"])  # fmt: skip
        for recorder in self.recorders:
            recorded.add_metric([recorder.stream_id], sum(_size(path) for path in list(recorder.segments)))
        yield recorded
        if (test := self.selftest) is not None:
            passed = GaugeMetricFamily("streamd_selftest_passed", "1: the golden frames' detections on this backend "
                                       "matched the reference within the precision's bar before READY=1 (a mismatch "
                                       "refuses to start).", labels=["backend", "device", "precision", "golden"])  # fmt: skip
            passed.add_metric([test.backend, test.device, test.precision, test.golden], 1)
            yield passed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed since (retention, a cleaned-up empty segment)
        return 0


MAX_WORKERS = 4  # threads that answer requests: a scrape and a health check at once, with room to spare
MAX_WAITING = 64  # accepted connections that have not sent a byte yet; past that the oldest is closed
FIRST_BYTE_S = 2.0  # how long a connection may stay silent after it is accepted
REQUEST_S = 2.0  # how long a worker waits on one connection's socket (reading the request, writing the answer)


class MetricsServer:
    """Serves /metrics (the collector) and /healthz on `bind` (HOST:PORT) from a thread of its own.

    health: what keeps the watchdog unfed now ([] when nothing), or None before
    the pipeline runs. states: each stream's state now (running, frozen, stale,
    reconnecting, ...), listed in /healthz's body after its first line.
    start() binds (OutputError if it cannot); close() stops.

    Bounded, so that idle or slow clients cannot starve /healthz: one thread
    accepts and waits (select) for each connection's first byte, FIRST_BYTE_S
    at most, holding at most MAX_WAITING silent connections (the oldest is
    closed for a new one); a connection that has sent something goes to one of
    MAX_WORKERS threads, which gives its socket REQUEST_S per read or write.
    """

    def __init__(
        self, bind: str, collector: RunCollector, health: Callable[[], list[str] | None],
        states: Callable[[], dict[str, str]] = dict,
    ):  # fmt: skip
        self.bind = bind
        self.states = states
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        self.health = health
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        host, port = split_host_port(self.bind)
        handler = type("Handler", (_Handler,), {"owner": self, "timeout": REQUEST_S})
        server_class = type("Server", (HTTPServer,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._server = server_class((host, int(port)), handler)  # SO_REUSEADDR, as preflight checks it
        except OSError as exc:
            raise OutputError(f"metrics: cannot serve on {self.bind}: {exc.strerror or exc}") from exc
        self._stop.clear()
        self._workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="metrics")
        self._thread = threading.Thread(target=self._accept, name="metrics", daemon=True)
        self._thread.start()
        log.info("serving /metrics and /healthz on http://%s", self.bind)

    def close(self) -> None:
        if self._server is None:
            return
        self._stop.set()
        self._thread.join()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._server.server_close()
        self._server = None

    def _accept(self) -> None:
        """Accept connections and hand each one that has sent a byte to a worker (the loop of the accept thread)."""
        server = self._server
        waiting: dict[socket.socket, float] = {}  # silent connection -> when it is closed (insertion order: oldest first)
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    if key.fileobj is server.socket:
                        try:
                            connection, _address = server.socket.accept()
                        except OSError:  # the client went away before the accept
                            continue
                        if len(waiting) >= MAX_WAITING:
                            oldest = next(iter(waiting))
                            del waiting[oldest]
                            selector.unregister(oldest)
                            oldest.close()
                        waiting[connection] = time.monotonic() + FIRST_BYTE_S
                        selector.register(connection, selectors.EVENT_READ)
                    else:
                        del waiting[key.fileobj]
                        selector.unregister(key.fileobj)
                        self._workers.submit(self._answer, key.fileobj)
                now = time.monotonic()
                for connection in [c for c, close_at in waiting.items() if close_at <= now]:
                    del waiting[connection]
                    selector.unregister(connection)
                    connection.close()
        for connection in waiting:
            connection.close()

    def _answer(self, connection: socket.socket) -> None:
        """Answer one request on `connection`, then close it (HTTP/1.0: one request per connection)."""
        try:
            self._server.finish_request(connection, connection.getpeername())
        except OSError as exc:  # the client timed out, reset or went away: nothing to answer
            log.debug("metrics: connection dropped: %s", exc)
        except Exception:  # a worker's error would vanish in its future: say it, and serve the next request
            log.exception("metrics: answering a request failed")
        finally:
            self._server.shutdown_request(connection)


class _Handler(BaseHTTPRequestHandler):
    owner: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.partition("?")[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.owner.registry))
        elif path == "/healthz":  # the process's health first, then each stream's state, a line each
            silent = self.owner.health()
            states = self.owner.states()
            streams = "".join(f"{stream_id}: {state}\n" for stream_id, state in states.items())
            stale = [stream_id for stream_id, state in states.items() if state == "stale"]
            if silent is None:
                self._reply(503, "text/plain; charset=utf-8", f"starting\n{streams}".encode())
            elif silent:
                self._reply(503, "text/plain; charset=utf-8", f"stalled: {', '.join(silent)}\n{streams}".encode())
            elif stale:  # running, but delivering nothing a subscriber can use: not "ok" (the watchdog is still fed)
                self._reply(503, "text/plain; charset=utf-8", f"stale: {', '.join(stale)}\n{streams}".encode())
            else:
                self._reply(200, "text/plain; charset=utf-8", f"ok\n{streams}".encode())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("metrics: " + format, *args)
