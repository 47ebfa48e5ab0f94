"""The supervisor: the main thread's watch over running workers.

While they run it feeds the systemd watchdog from their heartbeats (not from
a free timer: a stuck worker starves it), reports drops and a STATUS= line
every STATUS_EVERY_S, enforces --duration-s, and on a stop gives the drain
`drain_timeout_s`: half-way, a source still stuck in a read gets its
end-of-stream from here; at the end, blocked puts give up. Then it joins the
threads in pipeline order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from streamd.ops.logging import stream_extra
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline.queues import BoundedQueue
from streamd.pipeline.worker import TICK_S, Control
from streamd.types import EndOfStream

log = logging.getLogger(__name__)

STALL_S = 10.0  # a worker silent for this long is stuck: the systemd watchdog is no longer fed
STATUS_EVERY_S = 10.0  # STATUS= line and "dropped N" log interval


class Supervisor:
    """Watches `threads` (sources first, then the consumers in pipeline order) until they end or the drain runs out.

    sources: (stream id, its thread, its input queue), for ending a stuck source's stream.
    """

    def __init__(
        self,
        control: Control,
        notifier: SystemdNotifier,
        sources: list[tuple[str, threading.Thread, BoundedQueue]],
        threads: list[threading.Thread],
        *,
        drain_timeout_s: float,
        duration_s: float | None,
    ):
        self.control = control
        self.notifier = notifier
        self.sources = sources
        self.threads = threads
        self.drain_timeout_s = drain_timeout_s
        self.duration_s = duration_s
        self._drops_logged: dict[str, Counter] = {}
        self.watched_at = time.monotonic()  # the last turn of watch()'s loop
        control.supervisor = self  # the hook /healthz asks (streamd.ops.prometheus, wired by run_pipeline)

    def watch(self, started: float) -> None:
        control = self.control
        interval_s = self.notifier.watchdog_interval_s
        last_ping = last_status = time.monotonic()
        stop_seen_at: float | None = None
        forced = False
        while any(t.is_alive() for t in self.threads):
            next(t for t in self.threads if t.is_alive()).join(timeout=0.2)
            now = self.watched_at = time.monotonic()
            if self.duration_s is not None and now - started >= self.duration_s:
                control.stop("duration")
            if control.stop_event.is_set() and stop_seen_at is None:
                stop_seen_at = now
                control.stop("stop")  # keeps the first reason; names a bare stop_event.set()
                self.notifier.stopping(f"stopping ({control.stop_reason}): draining")
                log.info("stopping (%s): draining in-flight frames", control.stop_reason)
            if stop_seen_at is not None:
                if not forced and now - stop_seen_at > self.drain_timeout_s / 2:
                    forced = True
                    self._end_stuck_sources()
                if now - stop_seen_at > self.drain_timeout_s:
                    control.give_up_at = now
                    break
            if interval_s is not None and now - last_ping >= interval_s:
                stalled = self.stalled(now)
                if stalled:
                    log.error("not feeding the systemd watchdog: %s silent for over %.0f s", ", ".join(stalled), STALL_S)
                else:
                    self.notifier.watchdog()
                last_ping = now
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                self._report()
        self._join()

    def stalled(self, now: float) -> list[str]:
        """Workers past their stall limit. Sources are left out: a live read legitimately waits up to its timeout_s."""
        source_threads = {id(thread) for _, thread, _ in self.sources}
        return [
            t.name for t in self.threads
            if t.is_alive() and id(t) not in source_threads and now - self.control.beats.get(t.name, now) > STALL_S
        ]

    def silent(self, now: float) -> list[str]:
        """What keeps the watchdog unfed now (for /healthz): stalled workers, and this loop when it stopped turning."""
        return self.stalled(now) + (["supervisor"] if now - self.watched_at > STALL_S else [])

    def _report(self) -> None:
        summary = self.control.metrics.summary("running")
        for s in summary.streams:
            now = Counter(dict(s.dropped_by_queue))
            new = now - self._drops_logged.get(s.stream_id, Counter())  # the last interval's, per reason
            if new:
                log.warning("dropped %d frame(s) in the last %.0f s (%s)", sum(new.values()), STATUS_EVERY_S,
                            ", ".join(f"{q} {n}" for q, n in sorted(new.items())), extra=stream_extra(s.stream_id))
            self._drops_logged[s.stream_id] = now
        self.notifier.status(self.control.metrics.status_line())

    def _end_stuck_sources(self) -> None:
        """A source still inside a read half-way through the drain budget gets its end-of-stream from here."""
        for stream_id, thread, q in self.sources:
            if thread.is_alive():
                log.warning("source did not stop in time; ending its stream", extra=stream_extra(stream_id))
                q.put(EndOfStream(stream_id, error="source did not stop"), TICK_S)

    def _join(self) -> None:
        deadline = time.monotonic() + (self.drain_timeout_s if self.control.give_up_at is None else 0.5)
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def left_behind(self) -> list[str]:
        return [t.name for t in self.threads if t.is_alive()]
