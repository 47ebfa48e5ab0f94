"""The runner: owns every thread, queue and timeout of a composed pipeline.

Threads, in pipeline order:

    source:ID    one per stream: open (reconnect live sources with back-off), read, put
    infer        one: gather a batch fairly across streams, run the BatchInferStage, route results
    output:ID    one per stream with outputs: its stage flows (annotate -> record, detection log)
    publish      one, if publishing: the ZeroMQ socket lives in this thread only

The shutdown protocol, the only one:

- one stop event (set by a signal, the CLI's limits, a benchmark, or a fatal
  error). Sources stop reading when it is set; everything downstream drains
  what is in flight and ends on end-of-stream;
- every get and put has a timeout, so every loop sees the stop event and
  beats its heartbeat;
- a unique `EndOfStream` per stream, sent in `finally` by its source and
  forwarded by every worker (again in `finally`), so an error upstream still
  ends everyone downstream; a worker that failed keeps draining its input
  (discarding, counted) until end-of-stream, so no producer blocks forever;
- the supervisor joins in pipeline order within `drain_timeout_s` of the stop;
  a source still stuck (in a network read) past half of it gets its
  end-of-stream from the supervisor; a worker stuck past all of it is left
  behind (daemon thread) and named in the run's error.

Errors are classified at the stage boundary (`_call`): a RecoverableError is
logged, counted and the item skipped; a FatalError (or any unexpected
exception, wrapped into one) stops the pipeline and becomes the run's error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from streamd.backends.base import Backend
from streamd.config import StreamdConfig
from streamd.errors import FatalError, RecoverableError, SourceError, StreamdError
from streamd.model.bundle import Bundle
from streamd.ops.logging import stream_extra
from streamd.ops.metrics import Metrics, RunSummary
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline.graph import Branch, Flow, Outputs, Pipeline, build_pipeline
from streamd.pipeline.queues import BoundedQueue, Empty, FairQueueGroup, Full, Policy
from streamd.stages.batch import Batch
from streamd.types import EndOfStream, Frame, FrameResult

log = logging.getLogger(__name__)

TICK_S = 0.1  # every blocking get/put waits at most this long before looking at the stop event again
STALL_S = 10.0  # a worker silent for this long is stuck: the systemd watchdog is no longer fed
STATUS_EVERY_S = 10.0  # STATUS= line and "dropped N" log interval


class Runner:
    """Runs one Pipeline to its end; `run()` returns the RunSummary.

    stop_event: the pipeline's one stop event (the caller may set it at any time).
    max_frames: each source stops after this many frames. duration_s: stop after this long.
    notifier: systemd notifications (READY=1 after setup and warm-up, WATCHDOG=1 from the heartbeat).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        stop_event: threading.Event,
        *,
        drain_timeout_s: float = 10.0,
        max_frames: int | None = None,
        duration_s: float | None = None,
        notifier: SystemdNotifier | None = None,
    ):
        self.pipeline = pipeline
        self.metrics = metrics
        self.stop_event = stop_event
        self.drain_timeout_s = drain_timeout_s
        self.max_frames = max_frames
        self.duration_s = duration_s
        self.notifier = notifier or SystemdNotifier(socket_path="")
        self._error: str | None = None
        self._stop_reason: str | None = None
        self._error_lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._give_up_at: float | None = None  # monotonic; set when the drain budget after a stop runs out
        self._ends_routed: set[str] = set()  # streams whose end-of-stream the infer worker sent downstream
        self._build_queues()

    # --- wiring -----------------------------------------------------------------------------------

    def _build_queues(self) -> None:
        pipeline = self.pipeline
        condition = threading.Condition()
        self.group = FairQueueGroup(condition)
        self.inputs: dict[str, BoundedQueue] = {}
        self.outputs: dict[str, BoundedQueue] = {}
        for branch in pipeline.branches:
            sid = branch.stream_id
            policy = _resolve_policy(branch)
            self.inputs[sid] = self.group.add(
                BoundedQueue(f"{sid}:input", branch.queue_size, policy, self._counter(sid, "input"), condition)
            )
            if branch.outputs:
                self.outputs[sid] = BoundedQueue(f"{sid}:output", branch.queue_size, policy, self._counter(sid, "output"))
        self.publish_queue: BoundedQueue | None = None
        if pipeline.publisher is not None:
            # One queue for all streams: drop_oldest as soon as one stream is live (a live stream never
            # waits on a subscriber's side of the pipeline), block when all are files (no frame lost).
            live = any(_resolve_policy(b) == "drop_oldest" for b in pipeline.branches)
            size = sum(b.queue_size for b in pipeline.branches)
            self.publish_queue = BoundedQueue(
                "publish", size, "drop_oldest" if live else "block",
                lambda item: self.metrics.dropped(item.frame.stream_id, "publish"),
            )

    def _counter(self, stream_id: str, queue_name: str) -> Callable[[Any], None]:
        return lambda _item: self.metrics.dropped(stream_id, queue_name)

    # --- control ----------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Ask the pipeline to stop (first reason wins): sources stop reading, the rest drains."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self.stop_event.set()

    def _fail(self, message: str) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = message
        log.error("%s", message)
        self.stop("error")

    def _beat(self, worker: str) -> None:
        self._beats[worker] = time.monotonic()

    def _gave_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() > self._give_up_at

    def _put(self, q: BoundedQueue, item: Any, worker: str) -> bool:
        """Put with the protocol's timeouts; False (counted) if the drain budget ran out first."""
        while True:
            try:
                q.put(item, timeout_s=TICK_S)
                return True
            except Full:
                self._beat(worker)
                if self._gave_up():
                    if isinstance(item, (Frame, FrameResult)):
                        stream_id = item.stream_id if isinstance(item, Frame) else item.frame.stream_id
                        self.metrics.dropped(stream_id, "shutdown")
                    return False

    def _call(self, stage: Any, item: Any, stream_id: str) -> list[Any]:
        """stage.process(item) with its errors classified at the stage boundary."""
        try:
            return list(stage.process(item))
        except RecoverableError as exc:
            self.metrics.error(stream_id, str(exc))
            log.warning("%s: %s (item skipped)", stage.name, exc, extra=stream_extra(stream_id))
            return []
        except FatalError:
            raise
        except Exception as exc:  # a bug or an unclassified library error: stop rather than go on wrong
            log.exception("%s failed", stage.name, extra=stream_extra(stream_id))
            raise FatalError(f"{stage.name}: {type(exc).__name__}: {exc}") from exc

    # --- workers ----------------------------------------------------------------------------------

    def _source_worker(self, branch: Branch) -> None:
        source, sid, q = branch.source, branch.stream_id, self.inputs[branch.stream_id]
        worker = f"source:{sid}"
        extra = stream_extra(sid)
        error: str | None = None
        backoff_s = branch.reconnect_initial_s
        opened = False
        count = 0
        try:
            while not self.stop_event.is_set():
                self._beat(worker)
                try:
                    if not opened:
                        source.open()
                        opened = True
                        backoff_s = branch.reconnect_initial_s
                        log.info("connected", extra=extra)
                    frame = source.read()
                except SourceError as exc:
                    opened = False
                    if not source.live:
                        raise
                    self.metrics.error(sid, str(exc))
                    self.metrics.reconnect(sid)
                    log.warning("lost: %s; reconnecting in %.1f s", exc, backoff_s, extra=extra)
                    self.stop_event.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, branch.reconnect_max_s)
                    continue
                if frame is None:
                    log.info("end of stream after %d frames", count, extra=extra)
                    break
                self.metrics.frame_in(sid)
                if not self._put(q, frame, worker):
                    break
                count += 1
                if self.max_frames is not None and count >= self.max_frames:
                    log.info("stopping after --max-frames %d", self.max_frames, extra=extra)
                    break
        except SourceError as exc:  # a file that fails mid-read: its stream ends with the error
            error = str(exc)
            self.metrics.error(sid, error)
            self._fail(error)
        except FatalError as exc:
            error = str(exc)
            self._fail(error)
        except Exception as exc:
            log.exception("source failed", extra=extra)
            error = f"source {sid}: {type(exc).__name__}: {exc}"
            self._fail(error)
        finally:
            try:
                source.close()
            except StreamdError as exc:
                log.warning("close failed: %s", exc, extra=extra)
            self._put(q, EndOfStream(sid, error=error, extra={"frames": count}), worker)

    def _infer_worker(self) -> None:
        """Gather -> submit -> finish -> route; with an asynchronous backend, one batch may overlap the next."""
        pipeline, infer = self.pipeline, self.pipeline.infer
        max_wait_s = pipeline.max_wait_ms / 1e3
        depth = 2 if infer.overlaps else 1
        pending: deque[tuple[Any, list[EndOfStream]]] = deque()
        ended: set[str] = set()
        try:
            while len(ended) < len(self.inputs) or pending:
                waiting = bool(pending)
                items = self.group.get_batch(
                    pipeline.max_batch, 0.0 if waiting else max_wait_s, 0.0 if waiting else TICK_S
                )
                self._beat("infer")
                frames = [item for item in items if isinstance(item, Frame)]
                ends = [item for item in items if isinstance(item, EndOfStream)]
                for end in ends:
                    ended.add(end.stream_id)
                    self.group.remove(self.inputs[end.stream_id])
                if frames or ends:
                    batch = Batch(tuple(frames), time.time()) if frames else None
                    pending.append((infer.submit(batch) if batch else None, ends))
                while pending and (len(pending) >= depth or not frames or self.group.empty()):
                    in_flight, done = pending.popleft()
                    if in_flight is not None:
                        for result in infer.finish(in_flight):
                            self._route(result)
                    self._route_ends(done)
        except Exception as exc:
            self._fail(_describe("infer", exc))
            while pending:  # the ends of batches that never finished still have to go downstream
                self._route_ends(pending.popleft()[1])
            self._drain_inputs(ended)
        finally:
            for sid in self.inputs:  # whatever happened, every downstream worker gets its end
                if sid not in self._ends_routed:
                    self._route_ends([EndOfStream(sid, error=self._error)])
            try:
                infer.close()
            except Exception as exc:
                self._fail(_describe("infer close", exc))

    def _drain_inputs(self, ended: set[str]) -> None:
        """After a failure: consume (and count) the inputs until every stream has ended, so no source blocks."""
        while len(ended) < len(self.inputs) and not self._gave_up():
            self._beat("infer")
            for item in self.group.get_batch(64, 0.0, TICK_S):
                if isinstance(item, EndOfStream):
                    ended.add(item.stream_id)
                    self.group.remove(self.inputs[item.stream_id])
                    self._route_ends([item])
                else:
                    self.metrics.dropped(item.stream_id, "failed")

    def _route(self, result: FrameResult) -> None:
        sid = result.frame.stream_id
        self.metrics.result(result)
        if sid in self.outputs:
            self._put(self.outputs[sid], result, "infer")
        if self.publish_queue is not None:
            self._put(self.publish_queue, result, "infer")

    def _route_ends(self, ends: Iterable[EndOfStream]) -> None:
        for end in ends:
            self._ends_routed.add(end.stream_id)
            if end.stream_id in self.outputs:
                self._put(self.outputs[end.stream_id], end, "infer")
            if self.publish_queue is not None:
                self._put(self.publish_queue, end, "infer")

    def _output_worker(self, branch: Branch) -> None:
        sid, q = branch.stream_id, self.outputs[branch.stream_id]
        worker = f"output:{sid}"
        failed = False
        try:
            while True:
                try:
                    item = q.get(timeout_s=TICK_S)
                except Empty:
                    self._beat(worker)
                    if self._gave_up():
                        break
                    continue
                self._beat(worker)
                if isinstance(item, EndOfStream):
                    break
                if failed:
                    self.metrics.dropped(sid, "failed")
                    continue
                try:
                    for flow in branch.outputs:
                        self._run_flow(flow, item, sid)
                except Exception as exc:
                    failed = True
                    self._fail(_describe(f"outputs of {sid}", exc))
        finally:
            for stage in branch.stages_in_flow_order():
                try:
                    stage.close()
                except Exception as exc:
                    self._fail(_describe(f"{stage.name} close ({sid})", exc))

    def _run_flow(self, flow: Flow, item: Any, stream_id: str) -> None:
        for out in self._call(flow.stage, item, stream_id):
            for child in flow.then:
                self._run_flow(child, out, stream_id)

    def _publish_worker(self) -> None:
        publisher, q = self.pipeline.publisher, self.publish_queue
        streams_left = set(self.inputs)
        failed = False
        try:
            while streams_left:
                try:
                    item = q.get(timeout_s=TICK_S)
                except Empty:
                    self._beat("publish")
                    if self._gave_up():
                        break
                    continue
                self._beat("publish")
                if isinstance(item, EndOfStream):
                    streams_left.discard(item.stream_id)
                    continue
                if failed:
                    self.metrics.dropped(item.frame.stream_id, "failed")
                    continue
                try:
                    self._call(publisher, item, item.frame.stream_id)
                except Exception as exc:
                    failed = True
                    self._fail(_describe("publish", exc))
        finally:
            try:
                publisher.close()
            except Exception as exc:
                self._fail(_describe("publish close", exc))

    # --- supervisor -------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Set up (warm-up included), notify READY=1, run the workers, drain, join.

        Raises FatalError only when a stage cannot be set up (before READY=1);
        an error while running stops the pipeline and is the summary's `error`.
        """
        self._setup_all()
        sources = [threading.Thread(target=self._source_worker, args=(b,), name=f"source:{b.stream_id}", daemon=True)
                   for b in self.pipeline.branches]
        infer = [threading.Thread(target=self._infer_worker, name="infer", daemon=True)]
        outputs = [threading.Thread(target=self._output_worker, args=(b,), name=f"output:{b.stream_id}", daemon=True)
                   for b in self.pipeline.branches if b.outputs]
        publish = [threading.Thread(target=self._publish_worker, name="publish", daemon=True)] if self.publish_queue is not None else []
        ordered = [*sources, *infer, *outputs, *publish]
        started = time.monotonic()
        for thread in reversed(ordered):  # consumers first, so the first frame finds them waiting
            self._beat(thread.name)
            thread.start()
        self.notifier.ready(f"running {len(sources)} stream(s)")
        log.info("running %d stream(s)", len(sources))
        self._supervise(sources, ordered, started)
        self._join_in_order(sources, ordered)
        stuck = [t.name for t in ordered if t.is_alive()]
        if stuck:
            self._fail(f"workers did not stop within drain_timeout_s={self.drain_timeout_s}: {', '.join(stuck)}")
        stopped_by = "error" if self._error else self._stop_reason or ("stop" if self.stop_event.is_set() else "end")
        if stopped_by == "end" and self.max_frames is not None and all(
            self.metrics.processed(b.stream_id) >= self.max_frames for b in self.pipeline.branches
        ):
            stopped_by = "max_frames"
        return self.metrics.summary(stopped_by, self._error)

    def _setup_all(self) -> None:
        """setup() every stage in pipeline order in this thread, so a bad model or output fails before READY=1.

        The publisher's socket is created here and then used only by the publish
        thread (starting a thread is the memory barrier ZeroMQ asks for when a
        socket changes threads).
        """
        done = []
        try:
            for stage in self.pipeline.stages_in_order():
                stage.setup()
                done.append(stage)
        except Exception as exc:
            for stage in reversed(done):
                try:
                    stage.close()
                except Exception as close_exc:
                    log.warning("closing %s after a failed setup: %s", stage.name, close_exc)
            if isinstance(exc, FatalError):
                raise
            raise FatalError(_describe("setup", exc)) from exc

    def _supervise(self, sources: list[threading.Thread], ordered: list[threading.Thread], started: float) -> None:
        interval_s = self.notifier.watchdog_interval_s
        last_ping = last_status = time.monotonic()
        drops_logged: dict[str, int] = {}
        stop_seen_at: float | None = None
        forced = False
        while any(t.is_alive() for t in ordered):
            next(t for t in ordered if t.is_alive()).join(timeout=0.2)
            now = time.monotonic()
            if self.duration_s is not None and now - started >= self.duration_s:
                self.stop("duration")
            if self.stop_event.is_set() and stop_seen_at is None:
                stop_seen_at = now
                self._stop_reason = self._stop_reason or "stop"
                self.notifier.stopping(f"stopping ({self._stop_reason}): draining")
                log.info("stopping (%s): draining in-flight frames", self._stop_reason)
            if stop_seen_at is not None:
                if not forced and now - stop_seen_at > self.drain_timeout_s / 2:
                    forced = True
                    self._end_stuck_sources(sources)
                if now - stop_seen_at > self.drain_timeout_s:
                    self._give_up_at = now
                    break
            if interval_s is not None and now - last_ping >= interval_s:
                stalled = self._stalled(ordered, now)
                if stalled:
                    log.error("not feeding the systemd watchdog: %s silent for over %.0f s", ", ".join(stalled), STALL_S)
                else:
                    self.notifier.watchdog()
                last_ping = now
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                self._report(drops_logged)

    def _stalled(self, ordered: list[threading.Thread], now: float) -> list[str]:
        """Workers past their stall limit. Sources are left out: a live read legitimately waits up to its timeout_s."""
        return [
            t.name for t in ordered
            if t.is_alive() and not t.name.startswith("source:") and now - self._beats.get(t.name, now) > STALL_S
        ]

    def _report(self, drops_logged: dict[str, int]) -> None:
        summary = self.metrics.summary("running")
        for s in summary.streams:
            new = s.dropped - drops_logged.get(s.stream_id, 0)
            if new:
                log.warning("dropped %d frame(s) in the last %.0f s (%s)", new, STATUS_EVERY_S,
                            ", ".join(f"{q} {n}" for q, n in s.dropped_by_queue), extra=stream_extra(s.stream_id))
            drops_logged[s.stream_id] = s.dropped
        self.notifier.status(self.metrics.status_line())

    def _end_stuck_sources(self, sources: list[threading.Thread]) -> None:
        """A source still inside a read half-way through the drain budget gets its end-of-stream from here."""
        for branch, thread in zip(self.pipeline.branches, sources):
            if thread.is_alive():
                log.warning("source did not stop in time; ending its stream", extra=stream_extra(branch.stream_id))
                self.inputs[branch.stream_id].put(EndOfStream(branch.stream_id, error="source did not stop"), TICK_S)

    def _join_in_order(self, sources: list[threading.Thread], ordered: list[threading.Thread]) -> None:
        deadline = time.monotonic() + (self.drain_timeout_s if self._give_up_at is None else 0.5)
        for thread in ordered:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _resolve_policy(branch: Branch) -> Policy:
    if branch.queue_policy != "auto":
        return branch.queue_policy
    return "drop_oldest" if branch.source.live else "block"


def _describe(where: str, exc: BaseException) -> str:
    """One line for the run's error: StreamdErrors already say what failed; other exceptions get their type."""
    if isinstance(exc, StreamdError):
        return str(exc)
    return f"{where}: {type(exc).__name__}: {exc}"


def run_pipeline(
    config: StreamdConfig,
    stop_event: threading.Event | None = None,
    *,
    outputs: Outputs = Outputs(),
    max_frames: int | None = None,
    duration_s: float | None = None,
    notifier: SystemdNotifier | None = None,
    bundle: Bundle | None = None,
    backend: Backend | None = None,
) -> RunSummary:
    """Build and run a pipeline until its sources end, `stop_event` is set, or a limit is reached.

    For programs (the CLI, a benchmark): outputs turns recording, the
    detection log or publishing off; bundle/backend reuse ones already loaded.
    Raises FatalError when the pipeline cannot start (bundle, backend, an
    output's setup); errors while running end up in the summary's `error`.
    """
    pipeline = build_pipeline(config, outputs, bundle=bundle, backend=backend)
    try:
        runner = Runner(
            pipeline, pipeline.metrics, stop_event or threading.Event(), drain_timeout_s=config.drain_timeout_s,
            max_frames=max_frames, duration_s=duration_s, notifier=notifier,
        )
        return runner.run()
    finally:
        context = pipeline.zmq_context
        if context is not None:
            if pipeline.publisher is not None and pipeline.publisher.socket is not None:
                context.destroy(linger=0)  # the publish thread never closed its socket: do not wait for it
            else:
                context.term()
