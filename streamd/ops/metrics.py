"""Per-stream counters and latency samples, and the end-of-run summary.

The runner and the stages report into one `Metrics` object (thread-safe,
one lock); `Metrics.summary()` freezes it into a `RunSummary`, which the CLI
prints as a table and a benchmark reads as numbers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from streamd.types import FrameResult

LATENCY_NAMES = ("decode", "queue", "infer", "total")
# Enough samples for a stable p99 over a long run without growing without bound.
MAX_LATENCY_SAMPLES = 20_000


@dataclass
class _StreamCounters:
    frames_in: int = 0
    processed: int = 0
    detections: int = 0
    published: int = 0
    publish_dropped: int = 0
    reconnects: int = 0
    errors: int = 0
    dropped: Counter = field(default_factory=Counter)
    latency_ms: dict[str, deque] = field(
        default_factory=lambda: {name: deque(maxlen=MAX_LATENCY_SAMPLES) for name in LATENCY_NAMES}
    )
    first_frame_at: float | None = None
    last_result_at: float | None = None
    last_error: str | None = None


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
    errors: int
    fps: float
    latency_ms: tuple[tuple[str, float, float], ...]
    last_error: str | None = None

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

    def stream(self, stream_id: str) -> StreamSummary:
        for summary in self.streams:
            if summary.stream_id == stream_id:
                return summary
        raise KeyError(stream_id)

    def as_dict(self) -> dict:
        """Plain JSON-able numbers, for benchmarks and reports."""
        return {
            "duration_s": round(self.duration_s, 3),
            "stopped_by": self.stopped_by,
            "error": self.error,
            "streams": {
                s.stream_id: {
                    "frames_in": s.frames_in,
                    "processed": s.processed,
                    "dropped": dict(s.dropped_by_queue),
                    "detections": s.detections,
                    "published": s.published,
                    "publish_dropped": s.publish_dropped,
                    "reconnects": s.reconnects,
                    "errors": s.errors,
                    "fps": round(s.fps, 2),
                    "latency_ms": {k: {"p50": _round(p50), "p99": _round(p99)} for k, p50, p99 in s.latency_ms},
                }
                for s in self.streams
            },
        }


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(value, 3)


class Metrics:
    """Thread-safe per-stream counters; every method is cheap enough to call per frame."""

    def __init__(self, stream_ids: list[str] | tuple[str, ...]):
        self._lock = threading.Lock()
        self._streams = {stream_id: _StreamCounters() for stream_id in stream_ids}
        self.started_at = time.monotonic()

    def frame_in(self, stream_id: str) -> None:
        with self._lock:
            counters = self._streams[stream_id]
            counters.frames_in += 1
            if counters.first_frame_at is None:
                counters.first_frame_at = time.monotonic()

    def dropped(self, stream_id: str, queue_name: str, count: int = 1) -> None:
        """`count` frames of a stream discarded by the queue `queue_name` (input, output, publish)."""
        with self._lock:
            self._streams[stream_id].dropped[queue_name] += count

    def result(self, result: FrameResult) -> None:
        """One frame through the pipeline, with its final latency."""
        with self._lock:
            counters = self._streams[result.frame.stream_id]
            counters.processed += 1
            counters.detections += len(result.detections)
            counters.last_result_at = time.monotonic()
            for name in LATENCY_NAMES:
                counters.latency_ms[name].append(getattr(result.latency, name))

    def published(self, stream_id: str) -> None:
        with self._lock:
            self._streams[stream_id].published += 1

    def publish_dropped(self, stream_id: str) -> None:
        """A message ZeroMQ would not take (EAGAIN at the high-water mark)."""
        with self._lock:
            self._streams[stream_id].publish_dropped += 1

    def reconnect(self, stream_id: str) -> None:
        with self._lock:
            self._streams[stream_id].reconnects += 1

    def error(self, stream_id: str, text: str) -> None:
        """A recoverable error of a stream (logged by the caller)."""
        with self._lock:
            counters = self._streams[stream_id]
            counters.errors += 1
            counters.last_error = text

    def processed(self, stream_id: str) -> int:
        with self._lock:
            return self._streams[stream_id].processed

    def status_line(self) -> str:
        """A one-line state for systemd's STATUS=: frames and fps per stream."""
        summary = self.summary("running")
        return "; ".join(f"{s.stream_id}: {s.processed} frames, {s.fps:.1f} fps, {s.dropped} dropped" for s in summary.streams)

    def summary(self, stopped_by: str, error: str | None = None) -> RunSummary:
        with self._lock:
            streams = tuple(self._stream_summary(stream_id, c) for stream_id, c in self._streams.items())
        return RunSummary(
            streams=streams, duration_s=time.monotonic() - self.started_at, stopped_by=stopped_by, error=error
        )

    @staticmethod
    def _stream_summary(stream_id: str, c: _StreamCounters) -> StreamSummary:
        span_s = (c.last_result_at or 0.0) - (c.first_frame_at or 0.0)
        fps = (c.processed - 1) / span_s if c.processed > 1 and span_s > 0 else 0.0
        latency = []
        for name in LATENCY_NAMES:
            samples = np.fromiter(c.latency_ms[name], dtype=np.float64)
            if samples.size:
                p50, p99 = np.percentile(samples, [50, 99])
            else:
                p50 = p99 = float("nan")
            latency.append((name, float(p50), float(p99)))
        return StreamSummary(
            stream_id=stream_id,
            frames_in=c.frames_in,
            processed=c.processed,
            dropped_by_queue=tuple(sorted(c.dropped.items())),
            detections=c.detections,
            published=c.published,
            publish_dropped=c.publish_dropped,
            reconnects=c.reconnects,
            errors=c.errors,
            fps=fps,
            latency_ms=tuple(latency),
            last_error=c.last_error,
        )


def summary_table(summary: RunSummary) -> Table:
    """The end-of-run table: one row per stream, latencies as p50 / p99 in ms."""
    title = f"streamd: {summary.duration_s:.1f} s, stopped by {summary.stopped_by}"
    table = Table(title=title)
    for header in ("stream", "in", "processed", "dropped", "detections", "published", "fps",
                   "queue ms", "infer ms", "total ms", "reconnects", "errors"):
        table.add_column(header, justify="left" if header == "stream" else "right")
    for s in summary.streams:
        dropped = ", ".join(f"{name} {count}" for name, count in s.dropped_by_queue if count) or "0"
        published = str(s.published) + (f" (-{s.publish_dropped})" if s.publish_dropped else "")
        table.add_row(
            s.stream_id, str(s.frames_in), str(s.processed), dropped, str(s.detections), published,
            f"{s.fps:.1f}", *(_p50_p99(s.latency(name)) for name in ("queue", "infer", "total")),
            str(s.reconnects), str(s.errors),
        )
    return table


def _p50_p99(values: tuple[float, float]) -> str:
    p50, p99 = values
    return "-" if np.isnan(p50) else f"{p50:.1f} / {p99:.1f}"
