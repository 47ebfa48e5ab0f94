"""Per-stream counters and latency samples, and the end-of-run summary.

Everything that counts (the sources, the queues, the workers, the stages)
reports into one `Metrics` object the same way, `count(stream_id, name)`
with a name from `COUNTERS` or `dropped(reason)` (thread-safe, one lock);
`Metrics.summary()` freezes it into a `RunSummary`, which the CLI prints as a
table and a benchmark reads as numbers.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.table import Table

from streamd.types import Frame, Latency, StreamState

LATENCY_NAMES = ("decode", "queue", "infer", "total")  # Latency's fields without their _ms
# The counters of every stream, name -> what it counts (also /metrics' help text). An output or a worker that counts
# something of its own declares it when it is made (Metrics.declare: the publisher's published, the tracker's
# track_events, retention's), so a new output brings its counters with it. Drops are counted per reason under
# dropped(reason).
COUNTERS = {
    "frames_in": "Frames read from the source.",
    "processed": "Frames through inference.",
    "detections": "Objects found.",
    "outages": "Times a live source was lost (however many attempts it then took).",
    "reconnects": "Times a lost live source came back.",
    "errors": "Recoverable errors and failed outputs.",
    "opens": "Successful opens of the source (more than 1: it reconnected).",
    "loops": "Restarts of a looping file.",
    "corrupt_packets": "Packets the demuxer flagged or the decoder rejected (skipped).",
    "clock_jumps": "Jumps of the source's clock removed from pts.",
    "invalid_boxes": "Model output rows dropped as non-finite or without area.",
}
STALE_AFTER_S = 1.0  # a paced stream that delivered nothing for longer (and for its max_age_ms) is stale
_DROPPED = "dropped:"


def dropped(reason: str) -> str:
    """The counter name of frames dropped for `reason`: a queue name (input, output, publish), shutdown, or a failed stage."""
    return _DROPPED + reason


def drop_reason(name: str) -> str | None:
    """The reason of a dropped(reason) counter name; None for any other counter."""
    return name.removeprefix(_DROPPED) if name.startswith(_DROPPED) else None
# Enough samples for a stable p99 over a long run without growing without bound.
MAX_LATENCY_SAMPLES = 20_000
# Upper bounds (ms) of the cumulative latency histograms that /metrics exports; one more bucket holds the rest.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10000)


@dataclass
class _StreamCounters:
    counts: Counter = field(default_factory=Counter)
    latency_ms: dict[str, deque] = field(
        default_factory=lambda: {name: deque(maxlen=MAX_LATENCY_SAMPLES) for name in LATENCY_NAMES}
    )
    # Every sample since start, never forgotten: a count per LATENCY_BUCKETS_MS bucket (+1 above them) and the sum.
    latency_buckets: dict[str, list[int]] = field(
        default_factory=lambda: {name: [0] * (len(LATENCY_BUCKETS_MS) + 1) for name in LATENCY_NAMES}
    )
    latency_sum_ms: Counter = field(default_factory=Counter)
    first_frame_at: float | None = None
    last_result_at: float | None = None
    last_error: str | None = None
    end_error: str | None = None
    source_state: str = "starting"  # starting | running | reconnecting | ended | failed (run_source says)
    running_since: float | None = None  # monotonic: the source's last move to running
    # What is true of the stream over time (Metrics.observe: from each frame before any queue could drop it).
    frozen: bool = False
    outage_s: float = 0.0
    last_gap_s: float = 0.0
    last_jump_s: float = 0.0
    # Freshness: a paced stream's budget (None: never stale) and whether its results are delivered by a publisher.
    max_age_ms: float | None = None
    published: bool = False
    last_delivered_at: float | None = None


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """One stream's totals. latency_ms maps decode/queue/infer/total to (p50, p99) in ms."""

    stream_id: str
    frames_in: int
    processed: int
    dropped_by_queue: tuple[tuple[str, int], ...]
    detections: int
    published: int
    publish_dropped: int
    reconnects: int
    outages: int
    errors: int
    fps: float
    opens: int
    loops: int
    corrupt_packets: int
    latency_ms: tuple[tuple[str, float, float], ...]
    last_error: str | None = None
    end_error: str | None = None  # why the stream ended early (its source failed); None if it ran to its end

    @property
    def dropped(self) -> int:
        return sum(count for _, count in self.dropped_by_queue)

    def latency(self, name: str) -> tuple[float, float]:
        """(p50, p99) of one latency, ms; NaN when there were no samples."""
        for key, p50, p99 in self.latency_ms:
            if key == name:
                return p50, p99
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class StreamCounts:
    """One stream's raw counters and latency histograms at one moment, for exporters (streamd.ops.prometheus).

    counts: every counter of COUNTERS and every dropped(reason) counted so far, by name.
    latency_buckets: per latency name, (samples per LATENCY_BUCKETS_MS bucket, the last one above them all,
    sum of the samples in ms). fps: as in StreamSummary.
    """

    stream_id: str
    counts: tuple[tuple[str, int], ...]
    latency_buckets: tuple[tuple[str, tuple[int, ...], float], ...]
    fps: float


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run did. stopped_by: end (sources ended), signal, duration, max_frames, or error."""

    streams: tuple[StreamSummary, ...]
    duration_s: float
    stopped_by: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def processed(self) -> int:
        return sum(s.processed for s in self.streams)

    @property
    def failed_streams(self) -> tuple[StreamSummary, ...]:
        """Streams that ended early with an error (the others kept running)."""
        return tuple(s for s in self.streams if s.end_error is not None)

    def stream(self, stream_id: str) -> StreamSummary:
        for summary in self.streams:
            if summary.stream_id == stream_id:
                return summary
        raise KeyError(stream_id)


class Metrics:
    """Thread-safe per-stream counters; every method is cheap enough to call per frame."""

    def __init__(self, stream_ids: list[str] | tuple[str, ...]):
        self._lock = threading.Lock()
        self._streams = {stream_id: _StreamCounters() for stream_id in stream_ids}
        self._counters = dict(COUNTERS)
        self.started_at = time.monotonic()

    def declare(self, counters: Mapping[str, str]) -> None:
        """A part's own counters, name -> what it counts: they may be counted, and are reported (0 until then)."""
        with self._lock:
            self._counters.update(counters)

    def describe(self, name: str) -> str:
        """What a counter counts (its /metrics help)."""
        return self._counters.get(name, f"streamd counter {name}.")

    def count(self, stream_id: str, name: str, n: int = 1) -> None:
        """Add n to a stream's counter `name` (one of COUNTERS, one a part declared, or dropped(reason))."""
        if name not in self._counters and not name.startswith(_DROPPED):
            raise ValueError(f"unknown counter {name!r}: expected one of {tuple(self._counters)} or dropped(reason)")
        with self._lock:
            counters = self._streams[stream_id]
            counters.counts[name] += n
            if name == "frames_in" and counters.first_frame_at is None:
                counters.first_frame_at = time.monotonic()

    def count_dropped(self, item: Any, reason: str) -> None:
        """Count a dropped queue item under dropped(reason): one drop per frame it carries (a batch carries
        several, a frame's result one, a heartbeat none: an item of no stream carries `frames`)."""
        for frame in item.frames:  # a track event or a heartbeat carries none: not a frame dropped
            self.count(frame.stream_id, dropped(reason))

    def result(self, stream_id: str, detections: int, latency: Latency) -> None:
        """One frame through inference: counted as processed, its detections counted, its latency sampled."""
        with self._lock:
            counters = self._streams[stream_id]
            counters.counts["processed"] += 1
            counters.counts["detections"] += detections
            counters.last_result_at = time.monotonic()
            if not counters.published:
                counters.last_delivered_at = counters.last_result_at
            for name in LATENCY_NAMES:
                value_ms = getattr(latency, f"{name}_ms")
                counters.latency_ms[name].append(value_ms)
                counters.latency_buckets[name][bisect.bisect_left(LATENCY_BUCKETS_MS, value_ms)] += 1
                counters.latency_sum_ms[name] += value_ms

    def error(self, stream_id: str, text: str) -> None:
        """A recoverable error of a stream, or an output of it that failed (logged by the caller)."""
        with self._lock:
            counters = self._streams[stream_id]
            counters.counts["errors"] += 1
            counters.last_error = text

    def source_state(self, stream_id: str, state: str) -> None:
        """Where a stream's source is: starting, running, reconnecting, ended or failed (for the heartbeat)."""
        with self._lock:
            counters = self._streams[stream_id]
            if state == "running" and counters.source_state != "running":
                counters.running_since = time.monotonic()
            counters.source_state = state

    def freshness(self, stream_id: str, max_age_ms: float | None, published: bool) -> None:
        """A stream's stale budget (None: never stale) and whether a publisher delivers its results (else a result
        counts as delivered). Set once by compose."""
        with self._lock:
            counters = self._streams[stream_id]
            counters.max_age_ms, counters.published = max_age_ms, published

    def observe(self, frame: Frame) -> None:
        """Fold a decoded frame's flags into its stream's state, in the source's thread before any queue: an outage
        that ended (frame.gap_s), a clock jump (frame.pts_jump_s), frozen or not."""
        with self._lock:
            counters = self._streams[frame.stream_id]
            counters.frozen = frame.frozen
            if frame.gap_s > 0:
                counters.outage_s += frame.gap_s
                counters.last_gap_s = frame.gap_s
            if frame.pts_jump_s:
                counters.counts["clock_jumps"] += 1
                counters.last_jump_s = frame.pts_jump_s

    def delivered(self, stream_id: str) -> None:
        """A message of the stream went out (the publisher handed it to ZeroMQ)."""
        with self._lock:
            self._streams[stream_id].last_delivered_at = time.monotonic()

    def stream_state(self, stream_id: str) -> StreamState:
        """The stream's state now: what its messages and the heartbeat carry."""
        now = time.monotonic()
        with self._lock:
            return _state(self._streams[stream_id], now)

    def states(self) -> dict[str, tuple[StreamState, float | None, float | None]]:
        """Per stream: (its state, seconds since its last result, seconds since its last delivery; None: none yet)."""
        now = time.monotonic()
        with self._lock:
            return {
                sid: (_state(c, now), _since(c.last_result_at, now), _since(c.last_delivered_at, now))
                for sid, c in self._streams.items()
            }

    def ended(self, stream_id: str, error: str) -> None:
        """A stream ended early with an error (the first reason is kept)."""
        with self._lock:
            counters = self._streams[stream_id]
            counters.end_error = counters.end_error or error

    def processed(self, stream_id: str) -> int:
        with self._lock:
            return self._streams[stream_id].counts["processed"]

    def status_line(self) -> str:
        """A one-line state for systemd's STATUS=: frames and fps per stream."""
        summary = self.summary("running")
        return "; ".join(f"{s.stream_id}: {s.processed} frames, {s.fps:.1f} fps, {s.dropped} dropped" for s in summary.streams)

    def counts(self) -> tuple[StreamCounts, ...]:
        """Every stream's counters and latency histograms now (read by the /metrics endpoint on each scrape)."""
        with self._lock:
            return tuple(
                StreamCounts(
                    stream_id=stream_id,
                    counts=tuple(sorted({**dict.fromkeys(self._counters, 0), **c.counts}.items())),
                    latency_buckets=tuple(
                        (name, tuple(c.latency_buckets[name]), float(c.latency_sum_ms[name])) for name in LATENCY_NAMES
                    ),
                    fps=_fps(c),
                )
                for stream_id, c in self._streams.items()
            )

    def summary(self, stopped_by: str, error: str | None = None) -> RunSummary:
        with self._lock:
            streams = tuple(self._stream_summary(stream_id, c) for stream_id, c in self._streams.items())
        return RunSummary(
            streams=streams, duration_s=time.monotonic() - self.started_at, stopped_by=stopped_by, error=error
        )

    @staticmethod
    def _stream_summary(stream_id: str, c: _StreamCounters) -> StreamSummary:
        counts = c.counts
        fps = _fps(c)
        latency = []
        for name in LATENCY_NAMES:
            samples = np.fromiter(c.latency_ms[name], dtype=np.float64)
            if samples.size:
                p50, p99 = np.percentile(samples, [50, 99])
            else:
                p50 = p99 = float("nan")
            latency.append((name, float(p50), float(p99)))
        drops = sorted((name.removeprefix(_DROPPED), n) for name, n in counts.items() if name.startswith(_DROPPED))
        return StreamSummary(
            stream_id=stream_id,
            frames_in=counts["frames_in"],
            processed=counts["processed"],
            dropped_by_queue=tuple(drops),
            detections=counts["detections"],
            published=counts.get("published", 0),  # a publisher's (streamd.stages.publish), 0 without one
            publish_dropped=counts.get("publish_dropped", 0),
            reconnects=counts["reconnects"],
            outages=counts["outages"],
            errors=counts["errors"],
            fps=fps,
            opens=counts["opens"],
            loops=counts["loops"],
            corrupt_packets=counts["corrupt_packets"],
            latency_ms=tuple(latency),
            last_error=c.last_error,
            end_error=c.end_error,
        )


def _since(at: float | None, now: float) -> float | None:
    return None if at is None else now - at


def _state(c: _StreamCounters, now: float) -> StreamState:
    """The one rule for a stream's state: its source's, else stale (a paced stream that delivered nothing for
    max(STALE_AFTER_S, max_age_ms) while its source runs: every result too old, or none), else frozen, else running."""
    state = c.source_state
    if state == "running":
        if c.max_age_ms is not None:
            since = now - (c.last_delivered_at if c.last_delivered_at is not None else c.running_since or now)
            if since > max(STALE_AFTER_S, c.max_age_ms / 1e3):
                state = "stale"
        if state == "running" and c.frozen:
            state = "frozen"
    return StreamState(
        state=state, frozen=c.frozen, outages=c.counts["outages"], outage_s=c.outage_s, last_gap_s=c.last_gap_s,
        clock_jumps=c.counts["clock_jumps"], last_jump_s=c.last_jump_s,
    )  # fmt: skip


def _fps(c: _StreamCounters) -> float:
    """Frames through inference per second, from the stream's first frame in to its last result."""
    span_s = (c.last_result_at or 0.0) - (c.first_frame_at or 0.0)
    return (c.counts["processed"] - 1) / span_s if c.counts["processed"] > 1 and span_s > 0 else 0.0


def summary_table(summary: RunSummary) -> Table:
    """The end-of-run table: one row per stream, latencies as p50 / p99 in ms."""
    title = f"streamd: {summary.duration_s:.1f} s, stopped by {summary.stopped_by}"
    table = Table(title=title)
    for header in ("stream", "in", "processed", "dropped", "detections", "published", "fps",
                   "queue ms", "infer ms", "total ms", "outages", "loops", "corrupt", "errors"):
        if header == "stream":
            table.add_column(header, justify="left", no_wrap=True)  # a stream id is never cut
        else:
            table.add_column(header, justify="right")
    for s in summary.streams:
        dropped = ", ".join(f"{name} {count}" for name, count in s.dropped_by_queue if count) or "0"
        published = str(s.published) + (f" (-{s.publish_dropped})" if s.publish_dropped else "")
        table.add_row(
            s.stream_id, str(s.frames_in), str(s.processed), dropped, str(s.detections), published,
            f"{s.fps:.1f}", *(_p50_p99(s.latency(name)) for name in ("queue", "infer", "total")),
            str(s.outages), str(s.loops), str(s.corrupt_packets), str(s.errors),
        )
    return table


def _p50_p99(values: tuple[float, float]) -> str:
    p50, p99 = values
    return "-" if np.isnan(p50) else f"{p50:.1f} / {p99:.1f}"
