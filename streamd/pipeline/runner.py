"""The runner: runs a checked Graph to its end and returns the RunSummary.

Threads: one per source (`worker.run_source`), one per inbox (the batcher,
each queue: `worker.run_worker`), one per ticker (`worker.run_ticker`: the
heartbeat). The shutdown protocol, the only one:

- one stop event (a signal, the CLI's limits, a benchmark, or a fatal
  error). Sources stop reading when it is set; everything downstream drains
  what is in flight and ends on end-of-stream;
- every get and put has a timeout (worker.TICK_S), so every loop sees the
  stop event and beats its heartbeat;
- a unique `EndOfStream` per stream, sent in `finally` by its source and
  forwarded by every worker, so an error upstream still ends everyone
  downstream; a worker whose shared stage failed keeps draining its inbox
  (discarding, counted) until end-of-stream, so no producer blocks forever;
- the supervisor (streamd.pipeline.supervisor) joins in pipeline order
  within `drain_timeout_s` of the stop; a worker stuck past it is left
  behind (a daemon thread) and named in the run's error.
"""

from __future__ import annotations

import logging
import threading
import time

from streamd.errors import FatalError
from streamd.ops.metrics import RunSummary
from streamd.ops.systemd import SystemdNotifier
from streamd.ops.logging import stream_extra
from streamd.pipeline.graph import Graph, Worker
from streamd.pipeline.supervisor import Supervisor
from streamd.pipeline.worker import Control, describe, run_source, run_ticker, run_worker

log = logging.getLogger(__name__)


class Runner:
    """Runs one Graph; `run()` returns the RunSummary.

    stop_event: the pipeline's one stop event (the caller may set it at any time).
    max_frames: each source stops after this many frames. duration_s: stop after this long.
    notifier: systemd notifications (READY=1 after setup and warm-up, WATCHDOG=1 from the heartbeats).
    left_behind: after run(), the names of threads that did not stop in time.
    """

    def __init__(
        self,
        graph: Graph,
        stop_event: threading.Event,
        *,
        drain_timeout_s: float = 10.0,
        max_frames: int | None = None,
        duration_s: float | None = None,
        notifier: SystemdNotifier | None = None,
    ):
        self.graph = graph
        self.control = Control(stop_event, graph.metrics)
        self.drain_timeout_s = drain_timeout_s
        self.max_frames = max_frames
        self.duration_s = duration_s
        self.notifier = notifier or SystemdNotifier(socket_path="")
        self.left_behind: list[str] = []

    def stop(self, reason: str) -> None:
        self.control.stop(reason)

    def run(self) -> RunSummary:
        """Set up (warm-up included), notify READY=1, run the workers, drain, join.

        Raises FatalError only when a stage cannot be set up (before READY=1);
        an error while running stops the pipeline and is the summary's `error`.
        """
        graph, control = self.graph, self.control
        workers = graph.workers()
        if graph.batcher is not None:
            control.on_fail(graph.batcher.obj.disable_credits)
            control.release_credits = graph.batcher.obj.release
        failed_at_setup = self._setup_all(workers)
        sources = [
            (node.stream, threading.Thread(target=run_source, args=(node, q, control, self.max_frames),
                                           name=node.name, daemon=True), q)
            for node, q in graph.sources
        ]  # fmt: skip
        consumers = [threading.Thread(target=run_worker, args=(w, control, failed_at_setup), name=w.name, daemon=True)
                     for w in workers]  # fmt: skip
        tickers = [threading.Thread(target=run_ticker, args=(node, q, control), name=node.name, daemon=True)
                   for node, q in graph.tickers]  # fmt: skip
        threads = [thread for _, thread, _ in sources] + consumers
        started = time.monotonic()
        for thread in reversed(threads):  # consumers first, so the first frame finds them waiting
            control.beat(thread.name)
            thread.start()
        for thread in tickers:
            thread.start()
        self.notifier.ready(f"running {len(sources)} stream(s)")
        log.info("running %d stream(s)", len(sources))
        supervisor = Supervisor(control, self.notifier, sources, threads, drain_timeout_s=self.drain_timeout_s,
                                duration_s=self.duration_s)
        try:
            supervisor.watch(started)
        finally:
            control.finished.set()
            for thread in tickers:
                thread.join(timeout=1.0)
        self.left_behind = supervisor.left_behind()
        if self.left_behind:
            control.fail(f"workers did not stop within drain_timeout_s={self.drain_timeout_s}: {', '.join(self.left_behind)}")
        stopped_by = "error" if control.error else control.stop_reason or "end"
        if stopped_by == "end" and self.max_frames is not None and all(
            control.metrics.processed(node.stream) >= self.max_frames for node, _ in graph.sources
        ):
            stopped_by = "max_frames"
        return control.metrics.summary(stopped_by, control.error)

    def _setup_all(self, workers: list[Worker]) -> dict[int, str]:
        """setup() every stage in pipeline order in this thread, before READY=1; returns the stages of one stream
        that failed (id(node) -> why): they start failed and are retried, the rest of the run goes on.

        A shared stage that fails (the model, the publisher's bind) stops the start: FatalError. The
        publisher's socket is created here and then used only by its worker (starting a thread is the
        memory barrier ZeroMQ asks for when a socket changes threads).
        """
        done, failed = [], {}
        try:
            for node in (node for worker in workers for node in worker.nodes()):
                try:
                    node.obj.setup()
                except Exception as exc:
                    if node.stream is None:
                        raise
                    failed[id(node)] = describe(node.name, exc)
                    self.control.metrics.error(node.stream, failed[id(node)])
                    log.error("%s; this output of the stream starts stopped and is retried (the rest goes on)",
                              failed[id(node)], extra=stream_extra(node.stream))
                    continue
                done.append(node.obj)
            return failed
        except Exception as exc:
            for stage in reversed(done):
                try:
                    stage.close()
                except Exception as close_exc:
                    log.warning("closing %s after a failed setup: %s", stage.name, close_exc)
            if isinstance(exc, FatalError):
                raise
            raise FatalError(describe("setup", exc)) from exc
